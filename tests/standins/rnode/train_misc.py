"""Stand-in for RNODE's ``train_misc.py``: regulariser registry (argparse names), options, counters."""

import lib.layers as layers
import lib.layers.wrappers.cnf_regularization as reg_lib

REGULARIZATION_FNS = {
    "kinetic_energy": reg_lib.quadratic_cost,
    "jacobian_norm2": reg_lib.jacobian_frobenius_regularization_fn,
}


def standard_normal_logprob(z):
    import math

    return -0.5 * math.log(2 * math.pi) - z.pow(2) / 2


def set_cnf_options(args, model):
    def _set(module):
        if isinstance(module, layers.CNF):
            module.solver, module.atol, module.rtol = args.solver, args.atol, args.rtol
            if args.step_size is not None:
                module.solver_options["step_size"] = args.step_size
            module.test_solver = args.test_solver or args.solver
            module.test_atol = args.test_atol or args.atol
            module.test_rtol = args.test_rtol or args.rtol
            if args.test_step_size is not None:
                module.test_solver_options["step_size"] = args.test_step_size

    model.apply(_set)


def count_nfe(model):
    return sum(m.num_evals() for m in model.modules() if isinstance(m, layers.ODEfunc))


def count_total_time(model):
    return sum(
        m.sqrt_end_time * m.sqrt_end_time for m in model.modules() if isinstance(m, layers.CNF)
    )


def create_regularization_fns(args):
    pairs = [
        (fn, getattr(args, key))
        for key, fn in REGULARIZATION_FNS.items()
        if getattr(args, key) is not None
    ]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
