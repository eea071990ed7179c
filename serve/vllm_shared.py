"""vLLM's LoRA layers, extended to hold PSOFT adapters as k×k cores over one shared basis.

Installed by psoft-deploy's vLLM plugin (`psoft_deploy.serve.plugin`) in vLLM's processes when
serve sets ``PSOFT_DEPLOY_SHARED_BASIS`` (see `psoft_deploy.serve.shared`). What it changes:

- loading: a directory with ``psoft_cores.safetensors`` (no ``adapter_model.*``, so a vLLM without
  this extension refuses it) becomes a ``LoRAModel`` whose modules hold only their core (lora_b)
  and an empty marker (lora_a): k² numbers per module in vLLM's CPU cache;
- layers: each linear LoRA layer of a module in the basis (separate, packed or fused q/k/v and
  gate/up, column-, row-parallel or replicated), whose output slices are its modules' rows
  (`why_no_cores`), gets the basis once, sharded as vLLM shards the layer (`shard_bases`), and one
  k×k core slot per LoRA slot, replicated on every tensor-parallel rank (an
  adapter's module whose layer holds none gets its exact LoRA when the adapter loads). A slot
  holds either a core or an ordinary LoRA; the forward adds
  ``((x·V) · core[slot of token]) · Uᵀ`` for the core slots (one GEMM each side, whatever the
  number of adapters), and runs vLLM's own LoRA path where the layer is configured for it (an
  adapter served at start is exact LoRA, or one arrived in an eager engine): the same ops whatever
  the slots hold, so torch.compile and CUDA graphs capture it.

Everything else (slots, LRU caches, the token → slot mapping, adapter loading by name or endpoint)
stays vLLM's. Relies on vLLM's internals checked by `missing_internals` (vLLM 0.32).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from vllm.config import (
    CompilationConfig,
    CompilationMode,
    CUDAGraphMode,
    ParallelConfig,
    VllmConfig,
    get_current_vllm_config_or_none,
)
from vllm.distributed import parallel_state
from vllm.lora import utils as lora_utils
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
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
from vllm.utils import gpu_sync_debug

from psoft_deploy.core import internals
from psoft_deploy.core.formats import ADAPTER_WEIGHTS
from psoft_deploy.core.psoft import lora_of_core
from psoft_deploy.serve.shared import CoresEntry, SharedBasis

# The layer classes (exactly these, not subclasses: not the `...WithShardedLoRA` of --fully-sharded-loras) whose
# forward ends in `_apply_lora_to_output`, before a row-parallel layer's all-reduce, and whose output slices are
# the packed modules' rows (this rank's, sliced by the layer's `slice_lora_b`).
SHAREABLE_LAYERS = (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
                    MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA, ReplicatedLinearWithLoRA)
# What is relied on: the whole signature (names and kinds, in order) of each vLLM method or function the
# extension overrides or calls, and the attributes it reads on vLLM's objects.
RELIED_ON = {
    (LoRAModelManager, "register_module"): "(self, module_name, module)",
    (LoRAModelManager, "activate_adapter"): "(self, lora_id)",
    (LoRAModelManager, "get_adapter"): "(self, adapter_id)",
    (LoRAModel, "from_local_checkpoint"): ("(lora_dir, expected_lora_modules, peft_helper, *, lora_model_id, device, "
                                           "dtype, model_vocab_size, weights_mapper, skip_prefixes, moe_ep_spec)"),
    (LoRAModel, "__init__"): "(self, lora_model_id, rank, loras, is_3d_lora_weight, *, modules_to_save)",
    (LoRALayerWeights, "__init__"): "(self, module_name, rank, lora_alpha, lora_a, lora_b, scaling)",
    (BaseLinearLayerWithLoRA, "_apply_lora_to_output"): "(self, x, output)",
    (BaseLinearLayerWithLoRA, "set_lora"): "(self, index, lora_a, lora_b)",
    (BaseLinearLayerWithLoRA, "reset_lora"): "(self, index)",
    (LRUCacheWorkerLoRAManager, "add_adapter"): "(self, lora_request)",
    (lora_utils, "get_lora_id"): "()",
    (gpu_sync_debug, "gpu_sync_allowed"): "(first_only)",
    (parallel_state, "get_tensor_model_parallel_rank"): "()",
    **{(layer, f"slice_lora_{ab}"): f"(self, lora_{ab})" for layer in SHAREABLE_LAYERS for ab in "ab"},
}
READS = {
    **dict.fromkeys(SHAREABLE_LAYERS, ("lora_a_stacked", "lora_b_stacked", "output_slices", "n_slices", "tp_size",
                                       "punica_wrapper")),
    PunicaWrapperBase: ("_token_lora_indices",),
    LoRAModelManager: ("packed_modules_mapping", "_registered_adapters"),
    LRUCacheWorkerLoRAManager: ("_adapter_manager",),
    LoRAModel: ("loras",),
    LoRARequest: ("lora_int_id", "load_inplace"),
    PEFTHelper: ("r",),
    VllmConfig: ("compilation_config", "parallel_config"),
    ParallelConfig: ("pipeline_parallel_size",),
    CompilationConfig: ("mode", "cudagraph_mode"),
}
CORE_MARKER = torch.empty(0, 0)  # the lora_a of a module held as a core
logger = logging.getLogger("vllm.psoft_deploy")  # under vLLM's logger: its lines go to vLLM's log


def missing_internals(relied_on: dict = RELIED_ON, reads: dict = READS) -> str | None:
    """What this vLLM lacks or changed of the internals in ``relied_on`` (whole signatures) and ``reads``
    (attributes); by default the extension's. None: nothing."""
    return internals.missing("vLLM", relied_on, reads)


class BasisSlice(NamedTuple):
    """One output slice of a layer in the basis: its columns ``start:start+size`` of the output,
    its coordinates at ``offset`` of ``x·V``, ``U_t`` (Uᵀ) and a k×k core per slot."""

    start: int
    size: int
    offset: int
    U_t: torch.Tensor
    cores: torch.Tensor


class SharedBasisLayer:
    """Mixed into a vLLM LoRA layer: one basis per slice, a k×k core per LoRA slot and slice.

    The forward runs the same tensor ops for a given number of tokens whatever the slots hold (no branch
    on slot contents, no host sync), so that torch.compile and CUDA graphs can capture it. Whether it
    also runs vLLM's LoRA path is the layer's configuration (`psoft_exact_lora`), not the step's."""

    def attach_basis(self, bases: list[tuple[torch.Tensor, torch.Tensor] | None], exact_lora: bool) -> None:
        """``bases``: (U, V) per output slice as this rank holds them (`shard_bases`), None where the slice's
        module is not in the basis.
        ``exact_lora``: the layer runs vLLM's LoRA path too, in vLLM's own buffers; else those keep their
        shapes (vLLM reads them) without their memory until a nonzero exact LoRA is set (`set_lora`)."""
        self.psoft_exact_lora = exact_lora
        if not exact_lora:
            self.lora_a_stacked, self.lora_b_stacked = (
                tuple(torch.zeros(1, dtype=t.dtype, device=t.device).expand(t.shape) for t in stacked)
                for stacked in (self.lora_a_stacked, self.lora_b_stacked))
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

    def reset_lora(self, index: int):
        if self.psoft_exact_lora:
            super().reset_lora(index)
        for piece in filter(None, self.psoft_slices):
            piece.cores[index] = 0

    def set_lora(self, index: int, lora_a, lora_b):
        a_list = lora_a if isinstance(lora_a, list) else [lora_a]
        b_list = lora_b if isinstance(lora_b, list) else [lora_b]
        if not any(a is CORE_MARKER or (a is not None and a.numel() == 0) for a in a_list):
            if not any(t is not None and bool(t.any()) for t in (*a_list, *b_list)):
                self.reset_lora(index)  # all zero (vLLM's warm-up dummy): nothing to add
                return
            if not self.psoft_exact_lora:  # the first exact LoRA here, in an eager engine (see `install`)
                self.lora_a_stacked, self.lora_b_stacked = (tuple(torch.zeros_like(t) for t in stacked)
                                                            for stacked in (self.lora_a_stacked, self.lora_b_stacked))
                self.psoft_exact_lora = True
            for piece in filter(None, self.psoft_slices):
                piece.cores[index] = 0
            super().set_lora(index, lora_a, lora_b)
            return
        self.reset_lora(index)
        for piece, core in zip(self.psoft_slices, b_list):
            if core is None:
                continue
            if piece is None:
                raise ValueError("a PSOFT core arrived for a module outside the shared basis")
            piece.cores[index, :core.shape[1], :core.shape[0]].copy_(core.T)  # rows of Cᵀ: see `add_cores`

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.psoft_exact_lora:
            output = super()._apply_lora_to_output(x, output)
        if self.psoft_V is None:
            return output
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
        # vLLM's slot per token, read for this step's tokens (its own padding included) from its buffer
        slots = self.punica_wrapper._token_lora_indices[:flat_x.shape[0]]
        slots = torch.where((slots >= 0) & (slots < self.psoft_zero_slot), slots, self.psoft_zero_slot)
        coordinates = flat_x.to(self.psoft_V.dtype) @ self.psoft_V  # x·V for every slice at once
        for start, size, offset, U_t, cores in filter(None, self.psoft_slices):
            mixed = add_cores(coordinates[:, offset:offset + cores.shape[-1]], cores, slots)
            flat_out[:, start:start + size].addmm_(mixed.to(flat_out.dtype), U_t.to(flat_out.dtype))
        return output


def add_cores(coordinates: torch.Tensor, cores_t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``C[slot] · coordinates`` per token, with ``cores_t[slot]`` holding Cᵀ: one weighted sum of the
    slot's k rows per token (an embedding bag), never a per-token copy of its core. Extra memory O(tokens·k)."""
    rank = cores_t.shape[-1]
    rows = slots[:, None] * rank + torch.arange(rank, device=slots.device)
    return torch.nn.functional.embedding_bag(rows, cores_t.view(-1, rank), mode="sum",
                                             per_sample_weights=coordinates.contiguous())


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
    config = get_current_vllm_config_or_none()
    if config is not None and config.parallel_config.pipeline_parallel_size > 1:
        return f"pipeline parallel size {config.parallel_config.pipeline_parallel_size} (cores are held without it)"
    if not len(packed) == layer.n_slices == len(layer.output_slices):
        return f"{len(packed)} packed modules for {kind}'s {layer.n_slices} output slices"
    inputs = layer.lora_a_stacked[0].shape[-1]
    for name, rows, basis in zip(packed, layer.output_slices, shard_bases(layer, bases)):
        if basis is not None and (basis[0].shape[0], basis[1].shape[0]) != (rows, inputs):
            return (f"its slice for {name} is {rows}×{inputs} on this rank, the basis of {name} "
                    f"{basis[0].shape[0]}×{basis[1].shape[0]} there")
    return None


def shard_bases(layer, bases: list) -> list:
    """``bases`` ((U, V) per output slice, or None) as this tensor-parallel rank of ``layer`` holds them,
    sliced by the layer's own LoRA slicing as vLLM's `set_lora` slices a LoRA: U as a LoRA B (this rank's
    output rows of a column-parallel layer), Vᵀ as a LoRA A (this rank's input columns of a row-parallel one)."""
    if layer.tp_size == 1:
        return bases
    Us = [None if basis is None else basis[0] for basis in bases]
    Vts = [None if basis is None else basis[1].T for basis in bases]
    if isinstance(layer, MergedColumnParallelLinearWithLoRA):  # a LoRA per slice, as lists
        Us, Vts = layer.slice_lora_b(Us), layer.slice_lora_a(Vts)
    elif bases[0] is not None:
        Us, Vts = [layer.slice_lora_b(Us[0])], [layer.slice_lora_a(Vts[0])]
    return [None if U is None else (U, Vt.T) for U, Vt in zip(Us, Vts)]


def eager(config) -> bool:
    """Whether the engine of ``config`` runs its forward eagerly: neither torch.compile nor CUDA graphs."""
    return config is not None and (config.compilation_config.mode, config.compilation_config.cudagraph_mode) == (
        CompilationMode.NONE, CUDAGraphMode.NONE)


def install(basis_path: str, require_cores: bool = False, exact_lora: bool = False) -> None:
    """Extend vLLM's LoRA loading and layers in this process with the basis in ``basis_path``.
    Which modules hold cores is decided here, from the layers vLLM builds (`why_no_cores`); a
    module whose layer holds none gets its exact LoRA, or, with ``require_cores``, refuses the
    adapter on load. With ``exact_lora`` (an adapter served at start is exact LoRA) every layer it
    extends runs vLLM's LoRA path from the start; else only cores, and vLLM's LoRA buffers get their
    memory when a nonzero exact LoRA first arrives in the layer: only in an eager engine, since a
    compiled or captured forward would not see the change (elsewhere such an adapter is refused on load)."""
    shared = SharedBasis(Path(basis_path))
    names = shared.modules
    held: set[str] = set()  # modules whose layer holds their cores
    not_held: dict[str, str] = {}  # module -> its layer, and why it holds no cores
    extended: set[str] = set()  # modules of the layers it extends
    engine = {"switches": exact_lora,  # whether an exact LoRA may reach a layer that holds cores
              "told_tp": False}  # whether this process said the cores are held at tensor parallelism > 1

    def module_basis(name: str):
        return shared.vectors(name) if name in names else None

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
        module.attach_basis(shard_bases(module, bases), exact_lora)
        held.update(in_basis)
        extended.update(packed)
        engine["switches"] = exact_lora or eager(get_current_vllm_config_or_none())
        logger.debug("psoft-deploy: %s holds cores over the shared basis", module_name)
        if in_basis and module.tp_size > 1 and not engine["told_tp"] and speaks():
            engine["told_tp"] = True  # on stderr, relayed by serve (as the warnings below)
            print(f"psoft-deploy: cores held at tensor parallelism {module.tp_size}, each rank over its shard of "
                  "the basis", file=sys.stderr, flush=True)

    def speaks() -> bool:
        """Whether this process says what all tensor-parallel ranks would say alike: rank 0 does."""
        return parallel_state.get_tensor_model_parallel_rank() == 0

    load_checkpoint = LoRAModel.from_local_checkpoint.__func__

    def load_cores(cls, lora_dir, expected_lora_modules, peft_helper, *, lora_model_id=None, dtype=None, **kwargs):
        """Cores serve wrote (``psoft_cores.safetensors``), or those of a LoRA adapter loaded
        through vLLM (its load endpoint) that lies in the basis; else vLLM's own loader. A module
        whose layer holds no cores gets its exact LoRA, read off the pair: ``(V_kᵀ, U_k·C)``."""
        entry = CoresEntry(Path(lora_dir))
        if entry.holds_cores():
            cores = entry.cores(shared.digest)
        else:
            cores, why = shared.cores_of(Path(lora_dir)) if (Path(lora_dir) / ADAPTER_WEIGHTS).is_file() else (None, "")
            logger.info("psoft-deploy: %s loaded as %s (%s)", lora_dir, "cores" if cores else "exact LoRA", why)
        if cores is None:
            lora = load_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, lora_model_id=lora_model_id,
                                   dtype=dtype, **kwargs)
            if not engine["switches"] and extended & set(lora.loras):
                raise ValueError(f"{lora_dir}: an exact LoRA cannot join layers that hold only cores in a compiled "
                                 "or graph-captured engine; serve it at start, or pass --enforce-eager")
            return lora
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
            if any(cores[name].any() for name in apart) and speaks():  # not the bare base's all-zero core
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
        return cls(lora_utils.get_lora_id() if lora_model_id is None else lora_model_id, peft_helper.r, loras)

    add_adapter = LRUCacheWorkerLoRAManager.add_adapter

    def add_registered_adapter(self, lora_request):
        """vLLM's, without the copy of every registered adapter's id it makes to see whether this one is
        registered (for each adapter of each step: with thousands registered, most of the step)."""
        manager = self._adapter_manager
        if lora_request.load_inplace or lora_request.lora_int_id not in manager._registered_adapters:
            return add_adapter(self, lora_request)
        with gpu_sync_debug.gpu_sync_allowed():  # vLLM's own branch for a registered adapter
            loaded = manager.get_adapter(lora_request.lora_int_id) is not None
            manager.activate_adapter(lora_request.lora_int_id)
        return loaded

    LRUCacheWorkerLoRAManager.add_adapter = add_registered_adapter
    LoRAModelManager.register_module = register_with_basis
    LoRAModel.from_local_checkpoint = classmethod(load_cores)
    logger.info("psoft-deploy: vLLM's LoRA layers hold PSOFT cores over the shared basis %s (%d modules)",
                shared.digest, len(names))
