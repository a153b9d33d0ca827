"""No op synchronises the host with the device (CPU check of what a CUDA run would do).

Every cross-entropy (single device and vocab-parallel), BatchNorm and SyncBatchNorm call
runs, forward and backward, under a dispatch-level watcher (``HostSyncWatcher``) that sees
every aten op, including those issued inside fusedgrad's custom ops. The tensors a test
hands to the op (inputs, parameters, buffers) and everything computed from them count as
"device" tensors; any other tensor (``torch.tensor(...)``, a Python number assigned into an
element, ``lift_fresh``) is host data. The watcher fails the test on

- an op that reads device data back to the host (``.item()``, ``bool()``, ``nonzero``,
  ``masked_select``, ``unique``, boolean-mask indexing, ``equal``, ...): a stream sync on CUDA;
- host data flowing into an op on device tensors (``buf[i] = 1.0`` is ``copy_`` from a 0-dim
  CPU tensor): a blocking host-to-device copy on CUDA;
- ``Tensor.tolist()/.numpy()/.cpu()`` of a device tensor (seen through a wrapper, because
  on CPU they dispatch nothing).

Triton launches run with the watcher suspended (on CUDA they are launches, not aten ops).
Factories called without ``device=`` would make host tensors on CUDA but look the same as
device ones on CPU, so the sources of ops/ are checked for them statically.

Data checks that are free on CPU but not on CUDA: ops branch on
``fusedgrad._runtime.host_reads_free(device)``. The watched tests set ``_CPU_AS_DEVICE`` so
that CPU tensors take the branch a CUDA run takes (a device-side ``_assert_async``); a
separate test shows that the CPU branch is indeed a host read, so the switch is needed.
"""

import ast
import contextlib
import pathlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedgrad as fg
from fusedgrad import _runtime

from helpers import DEVICE

pytestmark = pytest.mark.skipif(
    DEVICE != "cpu", reason="CPU model of host synchronisation; on CUDA, "
    "test_cross_entropy_autograd.py::test_no_host_synchronisation uses the real sync debug mode")

# Ops that read device data on the host (CUDA synchronises the stream for each).
SYNC_OPS = {
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "_unique",
    "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "equal",
    "allclose", "bincount", "histc", "_assert_tensor_metadata_data",
}
# repeat_interleave syncs unless given output_size; index/index_put with a bool mask call
# nonzero first.
_BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
# Namespaces whose ops are aten-level (run as they are); anything else is a custom op
# whose Python implementation is run under the watcher so its aten ops are seen.
_LEAF_NAMESPACES = {"aten", "prim", "prims", "c10d", "_c10d_functional", "profiler"}


class HostSyncWatcher(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._device_storages = {}  # data_ptr -> storage (kept alive: no address reuse)
        self._device_empty = weakref.WeakValueDictionary()  # id -> empty tensor (no storage)
        self.problems: list[str] = []
        self._suspended = 0

    # ---- bookkeeping
    def mark_device(self, *tensors):
        for t in tree_flatten(list(tensors))[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.numel() == 0:
                self._device_empty[id(t)] = t
            else:
                st = t.untyped_storage()
                self._device_storages[st.data_ptr()] = st

    def _kind(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        if t.numel() == 0:
            return "device" if self._device_empty.get(id(t)) is t else "host"
        return "device" if t.untyped_storage().data_ptr() in self._device_storages else "host"

    @contextlib.contextmanager
    def suspended(self):
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    # ---- the check
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._suspended:
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        ns = func.namespace
        flat_args = tree_flatten((args, kwargs))[0]
        kinds = [self._kind(a) for a in flat_args]
        on_device = "device" in kinds
        if ns == "aten" and on_device:
            if name in SYNC_OPS:
                self.problems.append(f"{func}: reads device data on the host (sync)")
            if name in _BOOL_INDEX_OPS:
                indices = args[1] if len(args) > 1 else ()
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                       for i in indices or ()):
                    self.problems.append(f"{func}: boolean-mask indexing (nonzero, sync)")
            if name == "repeat_interleave" and kwargs.get("output_size") is None \
                    and isinstance(args[0], torch.Tensor) and len(args) > 1 \
                    and isinstance(args[1], torch.Tensor):
                self.problems.append(f"{func}: repeat_interleave without output_size (sync)")
        host_args = [a for a, k in zip(flat_args, kinds, strict=True) if k == "host"]
        if name == "lift_fresh" or name == "lift_fresh_copy":
            pass  # host data made from Python; flagged where it meets device tensors
        elif host_args and (on_device or kwargs.get("device") is not None):
            shapes = ", ".join(str(tuple(a.shape)) for a in host_args)
            self.problems.append(f"{func}: host tensor(s) {shapes} copied into device work "
                                 "(blocking host-to-device copy)")
        if ns not in _LEAF_NAMESPACES:
            out = self._run_custom_op(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if name not in ("lift_fresh", "lift_fresh_copy") and (
                on_device or kwargs.get("device") is not None):
            self.mark_device(out)
        return out

    def _run_custom_op(self, func, args, kwargs):
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
        if opdef is None:
            self.problems.append(f"{func}: a custom op the watcher cannot look into")
            return func(*args, **kwargs)
        impl = opdef._backend_fns.get("cpu") or opdef._init_fn
        with self:  # the implementation's aten ops go through this mode again
            return impl(*args, **kwargs)


_HOST_READS = ("tolist", "numpy", "cpu", "__array__")


@contextlib.contextmanager
def watching(cuda_branches: bool = True):
    """A HostSyncWatcher with Triton launches suspended and host reads wrapped; ops take
    the branches a CUDA run takes (cuda_branches=False: the CPU ones)."""
    from triton.runtime import interpreter, jit

    watcher = HostSyncWatcher()
    patched = []

    def wrap_launch(run):
        def launch(self, *args, **kwargs):
            with watcher.suspended():
                return run(self, *args, **kwargs)
        return launch

    def wrap_read(name, fn):
        def read(self, *args, **kwargs):
            if not watcher._suspended and watcher._kind(self) == "device":
                watcher.problems.append(f"Tensor.{name}() of a device tensor (sync)")
            return fn(self, *args, **kwargs)
        return read

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        patched.append((cls, "run", cls.run))
        cls.run = wrap_launch(cls.run)
    for name in _HOST_READS:
        fn = getattr(torch.Tensor, name)
        patched.append((torch.Tensor, name, fn))
        setattr(torch.Tensor, name, wrap_read(name, fn))
    old_flag, _runtime._CPU_AS_DEVICE = _runtime._CPU_AS_DEVICE, cuda_branches
    try:
        with watcher:
            yield watcher
    finally:
        _runtime._CPU_AS_DEVICE = old_flag
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)


def run_watched(fn, *device_tensors):
    with watching() as w:
        w.mark_device(*device_tensors)
        fn()
    assert not w.problems, "host synchronisation:\n  " + "\n  ".join(w.problems)


# ----------------------------------------------------------------------------- the watcher

@pytest.mark.parametrize("bad", ["setitem_float", "item", "bool", "nonzero", "mask_index",
                                 "tensor_const", "tolist"])
def test_watcher_catches(bad):
    # The watcher itself must fail on each kind of sync it claims to see.
    x = torch.randn(8)

    def body():
        buf = torch.ones(2, device=x.device)
        if bad == "setitem_float":
            buf[1] = 3.0
        elif bad == "item":
            x.sum().item()
        elif bad == "bool":
            bool(x.sum() > 0)
        elif bad == "nonzero":
            torch.nonzero(x)
        elif bad == "mask_index":
            x[x > 0]
        elif bad == "tensor_const":
            buf.mul_(torch.tensor([2.0, 3.0]))
        elif bad == "tolist":
            x.tolist()

    with watching() as w:
        w.mark_device(x)
        body()
    assert w.problems, f"{bad}: not caught"


def test_watcher_allows_device_only_work():
    x = torch.randn(8)

    def body():
        buf = torch.ones(2, device=x.device)
        buf[1] = x.sum()  # device -> device copy
        torch.where(x > 0, x, 0.0).sum()
        torch.full((1,), 3, dtype=x.dtype, device=x.device)
        torch._assert_async(~torch.isnan(x).any(), "nan")

    run_watched(body, x)


# ----------------------------------------------------------------------------- cross-entropy

def _ce_inputs(kind, n=6, v=50, dtype=torch.float32):
    base = (torch.randn(n, v) * 2).to(dtype).requires_grad_(True)
    if kind == "prob":
        t = torch.softmax(torch.randn(n, v), 1).to(dtype)
    else:
        t = torch.randint(0, v, (n,))
        t[0] = -100
    return base, t


CE_CASES = {
    # name: (target kind, kwargs, grad_output): one per host-path branch of the op.
    "mean": ("index", {}, None),
    "none_per_row_go": ("index", dict(reduction="none"), "rows"),
    "sum_go2": ("index", dict(reduction="sum"), 2.0),
    "weight_smoothing": ("index", dict(weight=True, label_smoothing=0.1), None),
    "prob_zloss": ("prob", dict(z_loss=1e-3), None),
    "prob_sum_weight": ("prob", dict(reduction="sum", weight=True), None),
    "inplace_softcap": ("index", dict(inplace_backward=True, softcap=10.0), None),
    "no_grad": ("index", dict(), "nograd"),
    "sum_divisor_float": ("index", dict(reduction="sum", divisor=3.0), None),
    "sum_divisor_tensor": ("prob", dict(reduction="sum", divisor="tensor"), None),
}


@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_no_host_sync(case):
    kind, kwargs, go = CE_CASES[case]
    kwargs = dict(kwargs)
    base, t = _ce_inputs(kind)
    if kwargs.get("weight") is True:
        kwargs["weight"] = torch.rand(base.shape[1])
    if kwargs.get("divisor") == "tensor":
        kwargs["divisor"] = torch.tensor(7.0)
    x = base * 1.0  # a non-leaf (inplace_backward refuses leaves)
    device = [base, x, t, kwargs.get("weight"), kwargs.get("divisor")]
    grad_rows = torch.randn(base.shape[0])

    def body():
        if go == "nograd":
            with torch.no_grad():
                fg.cross_entropy(x, t, **kwargs)
            return
        loss = fg.cross_entropy(x, t, **kwargs)
        if go == "rows":
            loss.backward(grad_rows)
        elif go is None:
            loss.backward()
        else:
            loss.backward(torch.full_like(loss, go))

    run_watched(body, *device, grad_rows)
    if go != "nograd":
        assert torch.isfinite(base.grad).all()


def test_cross_entropy_spatial_no_host_sync():
    base = torch.randn(2, 7, 3, 2, requires_grad=True)
    t = torch.randint(0, 7, (2, 3, 2))
    run_watched(lambda: fg.cross_entropy(base * 1.0, t, inplace_backward=True).backward(),
                base, t)


def test_cpu_target_check_is_a_host_read():
    # Why the watched tests take the device branch: on CPU the op checks the targets on
    # the host (free there, and it raises a clear ValueError); that branch is a host read,
    # which the watcher sees. CUDA runs the device-side assert instead.
    x, t = _ce_inputs("index")
    with watching(cuda_branches=False) as watcher:
        watcher.mark_device(x, t)
        fg.cross_entropy(x.detach(), t)
    assert watcher.problems and all("is_nonzero" in p or "_local_scalar_dense" in p
                                    or "aten.item" in p
                                    for p in watcher.problems), watcher.problems


def test_device_branch_target_check_asserts():
    # The device branch with a bad target reads nothing on the host: the prep kernel's
    # device assert fires on CUDA (test_ce_validate.py runs it there); Triton's
    # interpreter compiles device asserts out, so here only the NaN row shows.
    x = torch.randn(3, 5)
    t = torch.tensor([0, 5, 1])
    old, _runtime._CPU_AS_DEVICE = _runtime._CPU_AS_DEVICE, True
    try:
        loss = fg.cross_entropy(x, t)
    finally:
        _runtime._CPU_AS_DEVICE = old
    assert torch.isnan(loss)
    from fusedgrad.kernels import ce_prep

    assert "tl.device_assert(n_bad == 0" in pathlib.Path(ce_prep.__file__).read_text()


@pytest.mark.parametrize("case", ["index_weight_smoothing", "prob", "inplace_none"])
def test_vocab_parallel_no_host_sync(world_of_one, case):
    kind = "prob" if case == "prob" else "index"
    base, t = _ce_inputs(kind)
    kwargs = {}
    if case == "index_weight_smoothing":
        kwargs = dict(weight=torch.rand(base.shape[1]), label_smoothing=0.1)
    if case == "inplace_none":
        kwargs = dict(inplace_backward=True, reduction="none")
    x = base * 1.0
    grad_rows = torch.randn(base.shape[0])

    def body():
        loss = fg.cross_entropy(x, t, process_group=world_of_one, **kwargs)
        loss.backward(grad_rows if loss.dim() else None)

    run_watched(body, base, x, t, kwargs.get("weight"), grad_rows)
    assert torch.isfinite(base.grad).all()


# ----------------------------------------------------------------------------- BatchNorm

@pytest.mark.parametrize("case", ["train", "eval", "train_channels_last_half",
                                  "module_cumulative", "train_silu_residual"])
def test_batch_norm_no_host_sync(case):
    dtype = torch.float16 if case.endswith("half") else torch.float32
    x = torch.randn(3, 4, 5, 2).to(dtype)
    if "channels_last" in case:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn(x.shape).to(dtype)
    if case == "module_cumulative":
        m = fg.BatchNorm2d(4, momentum=None)
        run_watched(lambda: m(x).backward(dy), x, dy, *m.parameters(), *m.buffers())
        return
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    training = case != "eval"
    epilogue = {}
    if case == "train_silu_residual":  # the fused epilogue act(bn(x) + residual)
        epilogue = dict(activation="silu", residual=torch.randn(x.shape).to(dtype))
    run_watched(lambda: fg.batch_norm(x, rm, rv, w, b, training=training,
                                      **epilogue).backward(dy),
                x, dy, rm, rv, w, b, epilogue.get("residual"))
    assert torch.isfinite(x.grad).all()


def test_sync_batch_norm_no_host_sync(world_of_one):
    from fusedgrad.sync_batch_norm import sync_batch_norm

    x = torch.randn(4, 3, 5, requires_grad=True)
    dy = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.rand(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    run_watched(lambda: sync_batch_norm(x, rm, rv, w, b, 0.1, 1e-5, world_of_one).backward(dy),
                x, dy, rm, rv, w, b)
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- factories

_FACTORIES = {"empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "rand",
              "randn", "randint", "linspace", "eye", "scalar_tensor", "empty_strided"}


def test_ops_factories_name_a_device():
    # torch.zeros(3) inside an op makes a host tensor on a CUDA run; on CPU it is
    # indistinguishable at dispatch, so the sources are checked. torch.tensor/as_tensor
    # are host data even with device= (a host-to-device copy), so they are refused too.
    ops_dir = pathlib.Path(fg.__file__).parent
    bad = []
    for path in sorted(ops_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in _FACTORIES):
                continue
            has_device = any(k.arg == "device" for k in node.keywords)
            if node.func.attr in ("tensor", "as_tensor") or not has_device:
                bad.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    assert not bad, f"factories without device= (host tensors on CUDA): {bad}"
