"""Find what surrounds the NaN ops in a model's forward code and let the NaN ops absorb it.

Each module whose own ``forward`` calls NaN convolutions or unpoolings is traced with
``torch.fx`` (every submodule a leaf, so the graph is that one ``forward``). In the graph, a
NaN convolution absorbs, when each intermediate result has no other use:

- an activation before it (``nn.ReLU``/``nn.LeakyReLU``/``nn.PReLU``, ``torch.relu``), applied
  while its input is copied;
- an inference ``nn.BatchNorm2d`` after it (folded into the weights at call time);
- then an activation, then ``torch.maximum`` with a tensor computed before the convolution
  (FastSurfer's maxout), applied while the output is written;

and a NaN unpooling absorbs a ``torch.maximum`` with an earlier tensor (FastSurfer's decoder).
The module then gets a per-instance ``forward`` generated from the rewritten graph, which
passes those modules to the NaN ops at that call site (the modules, parameters and
``state_dict`` stay as they are). It runs the class's own ``forward`` instead whenever the
fusion could change what the user observes: in training mode, when a hook is registered on a
module involved (or globally), or under a torch dispatch mode (MCA). Modules whose forward
cannot be traced (Python control flow on tensor values or shapes, unsupported calls) keep
their forward; the reason is reported.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .fusion import activation
from .modules import NanConv2d, NanMaxUnpool2d

_RELU = (torch.relu, F.relu)
_MAXIMUM = (torch.maximum,)
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                                operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                                operator.imatmul, operator.setitem})


@dataclass(frozen=True)
class FusedSite:
    """One call site that absorbed its neighbours: the NaN op's name and what it absorbed."""

    op: str
    absorbed: str


class _Tracer(fx.Tracer):
    """Traces one module's own forward: every other module is a leaf."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def _containers(module: nn.Module) -> dict[str, object]:
    """Snapshots of the module's list/dict/set attributes (tracing must not change them)."""
    out = {}
    for name, value in vars(module).items():
        if isinstance(value, list | dict | set) and not name.startswith("_"):
            out[name] = copy.copy(value)
    return out


def _same(a: object, b: object) -> bool:
    """Same container contents, by identity of the items (tensors do not compare to a bool)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and [(k, id(v)) for k, v in a.items()] == [
            (k, id(v)) for k, v in b.items()]
    if isinstance(a, set):
        return isinstance(b, set) and {id(v) for v in a} == {id(v) for v in b}
    return isinstance(b, list) and [id(v) for v in a] == [id(v) for v in b]


def trace(module: nn.Module) -> fx.Graph | str:
    """The fx graph of ``module``'s own forward, or why it cannot be traced.

    A shallow copy is traced, so attributes set during tracing do not land on the module;
    a forward that changes its lists/dicts/sets (side effects fx cannot reproduce) is
    refused and the containers restored.
    """
    shallow = copy.copy(module)
    for name in ("_modules", "_parameters", "_buffers"):
        shallow.__dict__[name] = dict(vars(module)[name])
    shallow.__dict__.pop("forward", None)  # a fused forward from an earlier nanify
    before = _containers(module)
    try:
        graph: fx.Graph | str = _Tracer(shallow).trace(shallow)
    except Exception as err:  # noqa: BLE001 - any failure means "not traceable"
        first = str(err).splitlines()[0][:100] if str(err) else ""
        graph = f"torch.fx cannot trace its forward ({type(err).__name__}: {first})"
    for name, saved in before.items():
        value = getattr(module, name)
        if not _same(value, saved):
            if isinstance(value, list):
                value[:] = saved
            else:
                value.clear()
                value.update(saved)
            graph = f"its forward changes attribute {name!r}, which fusion cannot reproduce"
    return graph


def _inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or (name.endswith("_") and
                not name.endswith("__")) or "out" in node.kwargs or bool(
                node.kwargs.get("inplace")))
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


class _Graph:
    """Pattern matching and rewriting on one traced forward."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.graph = graph
        self.modules = dict(root.named_modules())
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.sites: list[FusedSite] = []
        self.involved: set[str] = set()

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def only_user(self, node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def activation(self, node: fx.Node | None) -> str | None:
        """The kwarg value naming the activation ``node`` computes (module name or "relu")."""
        if node is None or len(node.args) != 1 or _inplace(node, self.modules):
            return None
        if node.op == "call_module" and activation(self.module(node)) is not None:
            return node.target
        if node.op == "call_function" and node.target in _RELU and not node.kwargs:
            return "relu"
        return None

    def maximum_partner(self, node: fx.Node, user: fx.Node | None, before: fx.Node
                        ) -> fx.Node | None:
        """The other operand when ``user`` is ``torch.maximum(node, other)`` (either order)
        with ``other`` a node computed before ``before``."""
        if (user is None or user.op != "call_function" or user.target not in _MAXIMUM
                or user.kwargs or len(user.args) != 2):
            return None
        a, b = user.args
        other = b if a is node else a if b is node else None
        if (not isinstance(other, fx.Node) or other is node
                or self.order[other] >= self.order[before]):
            return None
        return other

    def clean_between(self, first: fx.Node, last: fx.Node) -> bool:
        """No in-place operation runs strictly between ``first`` and ``last``."""
        lo, hi = self.order[first], self.order[last]
        return not any(lo < i < hi and _inplace(n, self.modules) for n, i in self.order.items())

    def attr(self, name: str, before: fx.Node) -> fx.Node | str:
        if name == "relu":
            return name
        self.involved.add(name)
        with self.graph.inserting_before(before):
            return self.graph.get_attr(name)

    def fuse_conv(self, node: fx.Node) -> None:
        if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return
        absorbed, kwargs, erase = [], {}, []
        first = source = node.args[0]
        pre = self.activation(source)
        if pre is not None and len(source.users) == 1 and isinstance(source.args[0], fx.Node):
            kwargs["pre_activation"] = pre
            absorbed.append(f"{pre} before")
            erase.append(source)
            source = source.args[0]
        last = node
        user = self.only_user(last)
        bn = self.module(user) if user is not None else None
        if (type(bn) is nn.BatchNorm2d and bn.track_running_stats and user.args == (last,)
                and not user.kwargs):
            kwargs["batch_norm"] = user.target
            absorbed.append(f"{user.target} folded")
            erase.append(user)
            last = user
            user = self.only_user(last)
        post = self.activation(user)
        if post is not None:
            kwargs["post_activation"] = post
            absorbed.append(f"{post} after")
            erase.append(user)
            last = user
            user = self.only_user(last)
        partner = self.maximum_partner(last, user, node)
        if partner is not None:
            kwargs["maxout"] = partner
            absorbed.append(f"torch.maximum with {partner.name}")
            erase.append(user)
            last = user
        if not kwargs or not self.clean_between(first, last):
            return
        self.involved.add(node.target)
        node.args = (source,)
        node.kwargs = {k: v if k == "maxout" else self.attr(v, node) for k, v in kwargs.items()}
        last.replace_all_uses_with(node)
        for dead in reversed(erase):
            self.graph.erase_node(dead)
        self.sites.append(FusedSite(node.target, ", ".join(absorbed)))

    def fuse_unpool(self, node: fx.Node) -> None:
        if "maxout" in node.kwargs or len(node.args) > 3:
            return
        user = self.only_user(node)
        partner = self.maximum_partner(node, user, node)
        if partner is None or not self.clean_between(node, user):
            return
        self.involved.add(node.target)
        node.kwargs = {**node.kwargs, "maxout": partner}
        user.replace_all_uses_with(node)
        self.graph.erase_node(user)
        self.sites.append(FusedSite(node.target, f"torch.maximum with {partner.name}"))

    def fuse(self) -> None:
        for node in list(self.graph.nodes):
            op = self.module(node)
            if isinstance(op, NanMaxUnpool2d):
                self.fuse_unpool(node)
            elif isinstance(op, NanConv2d):
                self.fuse_conv(node)
        self.graph.lint()


def _compile(graph: fx.Graph) -> Callable:
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<nanprobe fused forward>", "exec"), namespace)  # noqa: S102
    return namespace["forward"]


class FusedForward:
    """A module's forward with its NaN ops' neighbours absorbed (set as ``module.forward``).

    Falls back to the class's forward in training mode, when a module involved (or any module,
    globally) has a forward hook or pre-hook, and under a torch dispatch mode. Pickling keeps
    only the module: the fused forward is derived again on first use.
    """

    def __init__(self, module: nn.Module, fn: Callable | None, involved: tuple[str, ...],
                 sites: tuple[FusedSite, ...]) -> None:
        self.module, self.fn, self.involved, self.sites = module, fn, involved, sites

    def _plain(self) -> bool:
        m = self.module
        if m.training or _get_current_dispatch_mode() is not None:
            return True
        if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
            return True
        for name in ("", *self.involved):
            sub = m.get_submodule(name) if name else m
            if sub._forward_hooks or sub._forward_pre_hooks or sub.training:
                return True
        return False

    def __call__(self, *args, **kwargs):
        if self.fn is None:  # unpickled: derive it again
            derived = fuse_module(self.module, install=False)
            self.fn = derived.fn if isinstance(derived, FusedForward) else False
        if self.fn is False or self._plain():
            return type(self.module).forward(self.module, *args, **kwargs)
        return self.fn(self.module, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"module": self.module, "involved": self.involved, "sites": self.sites}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, fn=None)

    def __deepcopy__(self, memo: dict) -> FusedForward:
        return FusedForward(copy.deepcopy(self.module, memo), self.fn, self.involved,
                            self.sites)


def fuse_module(module: nn.Module, install: bool = True) -> FusedForward | str | None:
    """Fuse what surrounds the NaN ops in ``module``'s own forward; with ``install``, set the
    result as ``module.forward``. Returns it, None when nothing could be absorbed, or the
    reason the forward could not be traced."""
    graph = trace(module)
    if isinstance(graph, str):
        return graph
    rewrite = _Graph(graph, module)
    rewrite.fuse()
    if not rewrite.sites:
        return None
    fused = FusedForward(module, _compile(graph), tuple(sorted(rewrite.involved)),
                         tuple(rewrite.sites))
    if install:
        module.forward = fused
    return fused


def calls_nan_ops(module: nn.Module) -> bool:
    """Whether ``module`` has a NaN conv or unpool child (whose calls its forward may fuse)."""
    return any(isinstance(m, NanConv2d | NanMaxUnpool2d) for m in module.children())


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> list[tuple[str, str]]:
    """The dense baseline's inference step: fold every ``nn.BatchNorm2d`` (inference mode, with
    running statistics) that only follows an ``nn.Conv2d`` into that convolution's weight and
    bias, and replace it by ``nn.Identity``, in place. Found by tracing each module's forward
    as :func:`fuse_module` does; returns the (conv, batch norm) names folded."""
    from .fusion import fold_batch_norm, foldable

    pairs = []
    for name, module in list(model.named_modules()):
        if not any(type(m) is nn.Conv2d for m in module.children()):
            continue
        graph = trace(module)
        if isinstance(graph, str):
            continue
        modules = dict(module.named_modules())
        for node in graph.nodes:
            conv = modules.get(node.target) if node.op == "call_module" else None
            if type(conv) is not nn.Conv2d or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            if bn is None or not foldable(bn) or user.args != (node,) or user.kwargs:
                continue
            weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
            conv.weight.copy_(weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(bias)
            else:
                conv.bias.copy_(bias)
            parent, _, child = user.target.rpartition(".")
            setattr(module.get_submodule(parent), child, nn.Identity())
            prefix = f"{name}." if name else ""
            pairs.append((prefix + node.target, prefix + user.target))
    return pairs
