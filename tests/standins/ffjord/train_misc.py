"""Stand-in for FFJORD's ``train_misc.py``: model building and the counters the scripts log."""

import math

import lib.layers as layers
import lib.layers.wrappers.cnf_regularization as reg_lib
import six

REGULARIZATION_FNS = {"l2int": reg_lib.l2_regularzation_fn}


def standard_normal_logprob(z):
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

    model.apply(_set)


def count_nfe(model):
    return sum(m.num_evals() for m in model.modules() if isinstance(m, layers.ODEfunc))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_total_time(model):
    return sum(
        m.sqrt_end_time * m.sqrt_end_time for m in model.modules() if isinstance(m, layers.CNF)
    )


def create_regularization_fns(args):
    pairs = [
        (fn, getattr(args, key))
        for key, fn in six.iteritems(REGULARIZATION_FNS)
        if getattr(args, key) is not None
    ]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def get_regularization(model, regularization_coeffs):
    acc = tuple([0.0] * len(regularization_coeffs))
    for m in model.modules():
        if isinstance(m, layers.CNF):
            acc = tuple(a + r for a, r in zip(acc, m.get_regularization_states()))
    return acc


def build_model_tabular(args, dims, regularization_fns=None):
    hidden_dims = tuple(map(int, args.dims.split("-")))

    def build_cnf():
        diffeq = layers.ODEnet(
            hidden_dims=hidden_dims, input_shape=(dims,), strides=None, conv=False
        )
        odefunc = layers.ODEfunc(diffeq=diffeq, divergence_fn=args.divergence_fn)
        return layers.CNF(
            odefunc=odefunc, T=args.time_length, train_T=args.train_T,
            regularization_fns=regularization_fns, solver=args.solver,
        )  # fmt: skip

    model = layers.SequentialFlow([build_cnf() for _ in range(args.num_blocks)])
    set_cnf_options(args, model)
    return model
