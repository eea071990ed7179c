"""vLLM's LoRA layers, extended to hold PSOFT adapters as k×k cores over one shared basis.

Installed by psoft-deploy's vLLM plugin (`psoft_deploy.serve.plugin`) in vLLM's processes when
serve sets ``PSOFT_DEPLOY_SHARED_BASIS`` (see `psoft_deploy.serve.shared`). What it changes:

- loading: a directory with ``psoft_cores.safetensors`` (no ``adapter_model.*``, so a vLLM without
  this extension refuses it) becomes a ``LoRAModel`` whose modules hold only their core (lora_b)
  and an empty marker (lora_a): k² numbers per module in vLLM's CPU cache;
- layers: each linear LoRA layer of a module in the basis (separate, packed or fused q/k/v and
  gate/up, column-, row-parallel or replicated, tensor parallelism 1), whose output slices are its
  modules' rows (`why_no_cores`), gets the basis once and one k×k core slot per LoRA slot (an
  adapter's module whose layer holds none gets its exact LoRA when the adapter loads). A slot
  holds either a core or an ordinary LoRA; the forward adds
  ``((x·V) · core[slot of token]) · Uᵀ`` for the core slots (one GEMM each side, whatever the
  number of adapters), and runs vLLM's own LoRA path only while an ordinary LoRA is loaded.

Everything else (slots, LRU caches, the token → slot mapping, adapter loading by name or endpoint)
stays vLLM's. Relies on vLLM's internals checked by `missing_internals` (vLLM 0.32).
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.utils import get_lora_id
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from psoft_deploy.formats import ADAPTER_WEIGHTS
from psoft_deploy.psoft import lora_of_core
from psoft_deploy.serve.shared import CORES_FILE, SharedBasis

# The layer classes (exactly these, not subclasses) whose forward ends in `_apply_lora_to_output` and
# whose output slices are the packed modules' rows, at tensor parallelism 1.
SHAREABLE_LAYERS = (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
                    MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA, ReplicatedLinearWithLoRA)
# What is relied on: method parameters by name, and attributes.
RELIED_ON = {
    (LoRAModelManager, "register_module"): ("module_name", "module"),
    (LoRAModel, "from_local_checkpoint"): ("lora_dir", "expected_lora_modules", "peft_helper", "lora_model_id", "dtype"),
    (LoRALayerWeights, "__init__"): ("module_name", "rank", "lora_alpha", "lora_a", "lora_b", "scaling"),
    (BaseLinearLayerWithLoRA, "_apply_lora_to_output"): ("x", "output"),
    (BaseLinearLayerWithLoRA, "set_lora"): ("index", "lora_a", "lora_b"),
    (BaseLinearLayerWithLoRA, "reset_lora"): ("index",),
    (PunicaWrapperBase, "token_lora_indices"): (),
    (LRUCacheWorkerLoRAManager, "add_adapter"): ("lora_request",),
    (LoRAModelManager, "activate_adapter"): ("lora_id",),
    (LoRAModelManager, "get_adapter"): ("adapter_id",),
}
CORE_MARKER = torch.empty(0, 0)  # the lora_a of a module held as a core
logger = logging.getLogger("vllm.psoft_deploy")  # under vLLM's logger: its lines go to vLLM's log


def missing_internals(relied_on: dict = RELIED_ON) -> str | None:
    """What this vLLM lacks of the internals in ``relied_on`` (by default the extension's; None: nothing)."""
    for (owner, name), parameters in relied_on.items():
        member = inspect.getattr_static(owner, name, None)
        if member is None:
            return f"vLLM's {owner.__name__}.{name} is gone"
        if parameters and not set(parameters) <= set(inspect.signature(getattr(owner, name)).parameters):
            return f"vLLM's {owner.__name__}.{name} no longer takes {', '.join(parameters)}"
    return None


class BasisSlice(NamedTuple):
    """One output slice of a layer in the basis: its columns ``start:start+size`` of the output,
    its coordinates at ``offset`` of ``x·V``, ``U_t`` (Uᵀ) and a k×k core per slot."""

    start: int
    size: int
    offset: int
    U_t: torch.Tensor
    cores: torch.Tensor


class SharedBasisLayer:
    """Mixed into a vLLM LoRA layer: one basis per slice, a k×k core per LoRA slot and slice."""

    def attach_basis(self, manager: LoRAModelManager, bases: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """``bases``: (U, V) per output slice, None where the slice's module is not in the basis;
        ``manager`` assigns the slots. vLLM's LoRA buffers keep their shapes (vLLM reads them) without
        their memory until a nonzero exact LoRA is set (`set_lora`)."""
        self.psoft_manager = manager
        self.lora_a_stacked, self.lora_b_stacked = (
            tuple(torch.zeros(1, dtype=t.dtype, device=t.device).expand(t.shape) for t in stacked)
            for stacked in (self.lora_a_stacked, self.lora_b_stacked))
        self.psoft_lora_buffers = False
        slots = self.lora_a_stacked[0].shape[0]
        dtype, device = self.lora_a_stacked[0].dtype, self.lora_a_stacked[0].device
        self.psoft_zero_slot = slots  # tokens without an adapter (-1) read this all-zero core
        self.psoft_slices, columns = [], []
        start, offset = 0, 0
        for size, basis in zip(self.output_slices, bases):
            if basis is not None:
                U, V = (t.to(dtype=dtype, device=device) for t in basis)
                cores = torch.zeros(slots + 1, V.shape[1], V.shape[1], dtype=dtype, device=device)
                self.psoft_slices.append(BasisSlice(start, size, offset, U.T.contiguous(), cores))
                columns.append(V)
                offset += V.shape[1]
            else:
                self.psoft_slices.append(None)
            start += size
        self.psoft_V = torch.cat(columns, dim=1).contiguous() if columns else None
        self.psoft_core_slots: set[int] = set()
        self.psoft_lora_slots: set[int] = set()

    def reset_lora(self, index: int):
        if self.psoft_lora_buffers:
            super().reset_lora(index)
        for piece in filter(None, self.psoft_slices):
            piece.cores[index] = 0
        self.psoft_core_slots.discard(index)
        self.psoft_lora_slots.discard(index)

    def set_lora(self, index: int, lora_a, lora_b):
        a_list = lora_a if isinstance(lora_a, list) else [lora_a]
        b_list = lora_b if isinstance(lora_b, list) else [lora_b]
        if not any(a is CORE_MARKER or (a is not None and a.numel() == 0) for a in a_list):
            if not any(t is not None and bool(t.any()) for t in (*a_list, *b_list)):
                self.reset_lora(index)  # all zero (vLLM's warm-up dummy): nothing to add
                return
            if not self.psoft_lora_buffers:  # the first exact LoRA on this layer: vLLM's buffers, for real
                self.lora_a_stacked, self.lora_b_stacked = (tuple(torch.zeros_like(t) for t in stacked)
                                                            for stacked in (self.lora_a_stacked, self.lora_b_stacked))
                self.psoft_lora_buffers = True
            super().set_lora(index, lora_a, lora_b)
            self.psoft_lora_slots.add(index)
            return
        self.reset_lora(index)
        for piece, core in zip(self.psoft_slices, b_list):
            if core is None:
                continue
            if piece is None:
                raise ValueError("a PSOFT core arrived for a module outside the shared basis")
            piece.cores[index, :core.shape[0], :core.shape[1]].copy_(core)
        self.psoft_core_slots.add(index)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        # vLLM leaves a deactivated adapter's weights in its slot: only assigned slots count.
        assigned = self.psoft_manager.lora_index_to_id
        if any(assigned[index] is not None for index in self.psoft_lora_slots):
            output = super()._apply_lora_to_output(x, output)
        if not self.psoft_core_slots:
            return output
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
        slots = self.punica_wrapper.token_lora_indices
        slots = torch.where(slots < 0, self.psoft_zero_slot, slots)
        coordinates = flat_x.to(self.psoft_V.dtype) @ self.psoft_V  # x·V for every slice at once
        for piece in filter(None, self.psoft_slices):
            start, size, offset, U_t, cores = piece
            rank = cores.shape[-1]
            mixed = torch.bmm(cores[slots], coordinates[:, offset:offset + rank, None])[:, :, 0]
            flat_out[:, start:start + size].addmm_(mixed.to(flat_out.dtype), U_t.to(flat_out.dtype))
        return output


_SHARED_CLASSES: dict[type, type] = {}


def _shared_class(cls: type) -> type:
    if cls not in _SHARED_CLASSES:
        _SHARED_CLASSES[cls] = type(f"PsoftShared{cls.__name__}", (SharedBasisLayer, cls), {})
    return _SHARED_CLASSES[cls]


def why_no_cores(layer, packed: list[str], bases: list) -> str | None:
    """Why the vLLM LoRA ``layer`` built for the modules ``packed`` (one per output slice) cannot
    hold cores over ``bases`` ((U, V) per module, None outside the basis); None when it can."""
    kind = type(layer).__name__
    if type(layer) not in SHAREABLE_LAYERS:
        return f"vLLM built it as {kind}, which psoft-deploy does not extend"
    if layer.tp_size != 1:
        return f"tensor parallel size {layer.tp_size} (cores are held at tensor parallelism 1)"
    if not len(packed) == layer.n_slices == len(layer.output_slices):
        return f"{len(packed)} packed modules for {kind}'s {layer.n_slices} output slices"
    inputs = layer.lora_a_stacked[0].shape[-1]
    for name, rows, basis in zip(packed, layer.output_slices, bases):
        if basis is not None and (basis[0].shape[0], basis[1].shape[0]) != (rows, inputs):
            return (f"its slice for {name} is {rows}×{inputs}, the basis of {name} "
                    f"{basis[0].shape[0]}×{basis[1].shape[0]}")
    return None


def install(basis_path: str, require_cores: bool = False) -> None:
    """Extend vLLM's LoRA loading and layers in this process with the basis in ``basis_path``.
    Which modules hold cores is decided here, from the layers vLLM builds (`why_no_cores`); a
    module whose layer holds none gets its exact LoRA, or, with ``require_cores``, refuses the
    adapter on load. Every layer it extends allocates vLLM's LoRA buffers only for a nonzero exact LoRA."""
    shared = SharedBasis(Path(basis_path))
    names = shared.modules
    held: set[str] = set()  # modules whose layer holds their cores
    not_held: dict[str, str] = {}  # module -> its layer, and why it holds no cores

    def module_basis(name: str):
        return (shared.tensors[f"{name}.U"], shared.tensors[f"{name}.V"]) if name in names else None

    register_module = LoRAModelManager.register_module

    def register_with_basis(self, module_name, module):
        register_module(self, module_name, module)
        prefix, _, leaf = module_name.rpartition(".")
        packed = [f"{prefix}.{sub}" if prefix else sub for sub in self.packed_modules_mapping.get(leaf) or [leaf]]
        bases = [module_basis(name) for name in packed]
        in_basis = [name for name, basis in zip(packed, bases) if basis is not None]
        why = why_no_cores(module, packed, bases)
        if why:
            not_held.update(dict.fromkeys(in_basis, f"its layer {module_name}: {why}"))
            return
        # Extended even outside the basis: vLLM's LoRA buffers are then allocated only for an exact LoRA.
        module.__class__ = _shared_class(type(module))
        module.attach_basis(self, bases)
        held.update(in_basis)
        logger.debug("psoft-deploy: %s holds cores over the shared basis", module_name)

    load_checkpoint = LoRAModel.from_local_checkpoint.__func__

    def load_cores(cls, lora_dir, expected_lora_modules, *args, peft_helper, lora_model_id=None, dtype=None, **kwargs):
        """Cores serve wrote (``psoft_cores.safetensors``), or those of a LoRA adapter loaded
        through vLLM (its load endpoint) that lies in the basis; else vLLM's own loader. A module
        whose layer holds no cores gets its exact LoRA, read off the pair: ``(V_kᵀ, U_k·C)``."""
        path = Path(lora_dir) / CORES_FILE
        if path.is_file():
            with safe_open(path, framework="pt") as handle:
                if handle.metadata().get("basis") != shared.digest:
                    raise ValueError(f"{lora_dir} holds cores over another basis than the one this server holds")
            cores = load_file(path)
        else:
            cores, why = shared.cores_of(Path(lora_dir)) if (Path(lora_dir) / ADAPTER_WEIGHTS).is_file() else (None, "")
            logger.info("psoft-deploy: %s loaded as %s (%s)", lora_dir, "cores" if cores else "exact LoRA", why)
        if cores is None:
            return load_checkpoint(cls, lora_dir, expected_lora_modules, *args, peft_helper=peft_helper,
                                   lora_model_id=lora_model_id, dtype=dtype, **kwargs)
        outside = sorted(set(cores) - names)
        if outside:
            raise ValueError(f"{lora_dir} has cores for modules outside the shared basis: {', '.join(outside)}")
        apart = {module: not_held.get(module, "vLLM built no LoRA layer for it")
                 for module in cores if module not in held}
        if apart:
            module, why = next(iter(apart.items()))
            if require_cores:
                raise ValueError(f"{lora_dir}: {module} cannot be held as a core here ({why}); "
                                 "serve it with --adapter-form auto or lora")
            unexpected = sorted({module.rsplit(".", 1)[-1] for module in apart} - set(expected_lora_modules))
            if unexpected:
                raise ValueError(f"While loading {lora_dir}, expected target modules in {expected_lora_modules} "
                                 f"but received {unexpected}")
            if any(cores[name].any() for name in apart):  # not the bare base's all-zero core
                # on stderr itself, as vLLM's errors: vLLM's logger writes to a buffered stdout
                print(f"psoft-deploy: warning: {lora_dir}: {len(apart)} of {len(cores)} modules served as exact "
                      f"LoRA, their layers hold no cores ({module}, {why})", file=sys.stderr, flush=True)
        loras = {}
        for name, core in cores.items():
            lora_a, lora_b = lora_of_core(core, *module_basis(name)) if name in apart else (CORE_MARKER, core)
            if dtype:
                lora_a, lora_b = (t if t is CORE_MARKER else t.to(dtype) for t in (lora_a, lora_b))
            loras[name] = LoRALayerWeights(module_name=name, rank=core.shape[0], lora_alpha=core.shape[0],
                                           lora_a=lora_a, lora_b=lora_b, scaling=1.0)
        return cls(get_lora_id() if lora_model_id is None else lora_model_id, peft_helper.r, loras)

    add_adapter = LRUCacheWorkerLoRAManager.add_adapter

    def add_registered_adapter(self, lora_request):
        """vLLM's, without the copy of every registered adapter's id it makes to see whether this one is
        registered (for each adapter of each step: with thousands registered, most of the step)."""
        manager = self._adapter_manager
        if lora_request.load_inplace or lora_request.lora_int_id not in manager._registered_adapters:
            return add_adapter(self, lora_request)
        with gpu_sync_allowed():  # vLLM's own branch for a registered adapter
            loaded = manager.get_adapter(lora_request.lora_int_id) is not None
            manager.activate_adapter(lora_request.lora_int_id)
        return loaded

    LRUCacheWorkerLoRAManager.add_adapter = add_registered_adapter
    LoRAModelManager.register_module = register_with_basis
    LoRAModel.from_local_checkpoint = classmethod(load_cores)
    logger.info("psoft-deploy: vLLM's LoRA layers hold PSOFT cores over the shared basis %s (%d modules)",
                shared.digest, len(names))
