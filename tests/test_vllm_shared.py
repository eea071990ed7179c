"""vLLM's LoRA layer extended to hold cores (`psoft_deploy.serve.vllm_shared`), in-process: the check of
the vLLM internals it relies on, its forward compiled to one graph (no branch on what the slots hold,
no host sync), and its basis sharded over tensor-parallel ranks as vLLM shards the layer's weight.
tests/test_serve_shared.py serves through real vLLM servers."""

import pytest
import torch
from vllm.config import LoRAConfig, ParallelConfig, VllmConfig, set_current_vllm_config
from vllm.lora import layers as lora_layers
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.model_executor import parameter
from vllm.model_executor.layers import linear
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from psoft_deploy.serve import endpoint, vllm_shared
from psoft_deploy.serve.vllm_shared import CORE_MARKER, missing_internals, shard_bases, why_no_cores

IN, OUT, RANK, SLOTS = 32, 48, 8, 4


class Layer:
    def __init__(self):
        self.n_slices = 1

    def _apply_lora_to_output(self, x, output, *, base_output_bias=None):
        return output


def test_the_installed_vllm_has_every_internal_relied_on():
    assert missing_internals() is None
    assert missing_internals(endpoint.RELIED_ON, endpoint.READS) is None


def test_the_internals_check_reports_a_new_keyword_only_parameter_and_a_missing_attribute(monkeypatch):
    said = missing_internals({(Layer, "_apply_lora_to_output"): "(self, x, output)"}, {})
    assert said == ("vLLM's Layer._apply_lora_to_output is now (self, x, output, *, base_output_bias), "
                    "psoft-deploy was checked on (self, x, output)")
    assert missing_internals({}, {Layer: ("n_slices",)}) is None  # assigned in __init__
    assert missing_internals({}, {Layer: ("n_slices", "output_slices")}) == "vLLM's Layer no longer has output_slices"
    # The same on vLLM's own class, as the check before serve starts sees it.
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_lora_to_output", Layer._apply_lora_to_output)
    assert "base_output_bias" in missing_internals()


@pytest.fixture
def mapping():
    """A real CPU punica wrapper; ``mapping(slots)`` maps one decode token per slot (-1: no adapter)."""
    punica = PunicaWrapperCPU(64, 8, "cpu")

    def set_slots(slots: list[int]):
        ids = tuple(slot + 1 for slot in slots)  # adapter id = slot + 1; 0 = none
        punica.update_metadata(LoRAMapping(ids, ids, is_prefill=False), list(range(1, SLOTS + 1)), SLOTS, 100)
        return punica

    return set_slots


def extended_layer(monkeypatch, exact_lora: bool, punica) -> tuple:
    """A real ``ReplicatedLinearWithLoRA`` (tensor parallelism 1), extended over a basis (U, V) of rank RANK."""
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    with set_current_vllm_config(VllmConfig()):
        base = ReplicatedLinear(IN, OUT, bias=False, params_dtype=torch.float32, disable_tp=True)
        layer = lora_layers.ReplicatedLinearWithLoRA(base)
        layer.create_lora_weights(SLOTS, LoRAConfig(max_lora_rank=RANK, max_loras=SLOTS, lora_dtype=torch.float32), None)
    layer.set_mapping(punica)
    U, V = torch.linalg.qr(torch.randn(OUT, RANK))[0], torch.linalg.qr(torch.randn(IN, RANK))[0]
    layer.__class__ = vllm_shared._shared_class(lora_layers.ReplicatedLinearWithLoRA)
    layer.attach_basis([(U, V)], exact_lora)
    return layer, U, V


@pytest.mark.parametrize("exact_lora", [False, True], ids=["cores-only", "mixed"])
def test_the_layer_forward_is_one_graph_whatever_the_slots_hold_and_equals_eager(monkeypatch, mapping, exact_lora):
    torch.manual_seed(0)
    punica = mapping([0, 1, -1, 2, 0])
    layer, U, V = extended_layer(monkeypatch, exact_lora, punica)
    cores = {slot: torch.randn(RANK, RANK) for slot in (0, 1)}
    for slot, core in cores.items():
        layer.set_lora(slot, CORE_MARKER, core)
    deltas = {slot: U @ core @ V.T for slot, core in cores.items()}
    if exact_lora:
        lora_a, lora_b = torch.randn(RANK, IN), torch.randn(OUT, RANK)
        layer.set_lora(2, lora_a, lora_b)
        deltas[2] = lora_b @ lora_a
    compiled = torch.compile(layer._apply_lora_to_output, fullgraph=True)
    x = torch.randn(5, IN)

    def check(slots: list[int]):
        want = torch.stack([deltas[s] @ row if s in deltas else torch.zeros(OUT) for s, row in zip(slots, x)])
        eager = layer._apply_lora_to_output(x, torch.zeros(5, OUT))
        torch.testing.assert_close(eager, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(x, torch.zeros(5, OUT)), eager, rtol=1e-5, atol=1e-5)

    check([0, 1, -1, 2, 0])
    # Other slot contents and another mapping, same graph: no recompilation.
    with torch.compiler.set_stance("fail_on_recompile"):
        layer.reset_lora(1)
        del deltas[1]
        cores[3] = torch.randn(RANK, RANK)
        layer.set_lora(3, CORE_MARKER, cores[3])
        deltas[3] = U @ cores[3] @ V.T
        mapping([3, 2, 1, 0, -1])
        check([3, 2, 1, 0, -1])


HEAD = 8  # head size of the q/k/v layers below: 4 query heads over IN = 32
F32 = {"bias": False, "params_dtype": torch.float32}
TP_LAYERS = {  # vLLM's layer, its LoRA layer, and the sizes of the modules packed in it: (out, in) each
    "q/k/v, GQA": (lambda: QKVParallelLinear(IN, HEAD, 4, 2, **F32), lora_layers.MergedQKVParallelLinearWithLoRA,
                   {"q": (32, IN), "k": (16, IN), "v": (16, IN)}),
    "q/k/v, one KV head on both ranks": (lambda: QKVParallelLinear(IN, HEAD, 4, 1, **F32),
                                         lora_layers.MergedQKVParallelLinearWithLoRA,
                                         {"q": (32, IN), "k": (8, IN), "v": (8, IN)}),
    "qkv fused in the checkpoint": (lambda: QKVParallelLinear(IN, HEAD, 4, 2, **F32),
                                    lora_layers.QKVParallelLinearWithLoRA, {None: (64, IN)}),
    "gate/up": (lambda: MergedColumnParallelLinear(IN, [OUT, OUT], **F32), lora_layers.MergedColumnParallelLinearWithLoRA,
                {0: (OUT, IN), 1: (OUT, IN)}),
    "gate_up fused in the checkpoint": (lambda: MergedColumnParallelLinear(IN, [OUT, OUT], **F32),
                                        lora_layers.ColumnParallelLinearWithLoRA, {None: (2 * OUT, IN)}),
    "row-parallel": (lambda: RowParallelLinear(OUT, IN, **F32), lora_layers.RowParallelLinearWithLoRA, {None: (IN, OUT)}),
}


@pytest.mark.parametrize("kind", TP_LAYERS)
def test_each_tensor_parallel_rank_holds_the_basis_as_vllm_shards_the_layer_weight(monkeypatch, mapping, kind):
    """At tensor parallelism 2, each rank's cores add exactly what the update U·C·Vᵀ adds when vLLM loads
    it as the layer's weight on that rank (its output rows, or its input columns, partial sums reduced
    after); summed over the ranks of a row-parallel layer, the whole update."""
    torch.manual_seed(0)
    build, lora_class, modules = TP_LAYERS[kind]
    bases = [(torch.linalg.qr(torch.randn(out, RANK))[0], torch.linalg.qr(torch.randn(inputs, RANK))[0])
             for out, inputs in modules.values()]
    cores = [torch.randn(RANK, RANK) for _ in modules]
    updates = [U @ core @ V.T for (U, V), core in zip(bases, cores)]
    x = torch.randn(5, next(iter(modules.values()))[1])
    punica = mapping([0, 0, 0, 0, 0])
    partials = []
    for rank in (0, 1):
        for module in (linear, parameter):
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: 2)
        with set_current_vllm_config(VllmConfig()):
            base = build()
            layer = lora_class(base)
            layer.create_lora_weights(SLOTS, LoRAConfig(max_lora_rank=RANK, max_loras=SLOTS, lora_dtype=torch.float32))
        for shard, update in zip(modules, updates):  # vLLM loads the update as the weight, sharding it
            base.weight.weight_loader(base.weight, update, *([] if shard is None else [shard]))
        x_here = x.chunk(2, dim=1)[rank] if lora_class is lora_layers.RowParallelLinearWithLoRA else x
        want = x_here @ base.weight.T  # this rank's shard of the update
        layer.set_mapping(punica)
        assert why_no_cores(layer, list(modules), bases) is None
        layer.__class__ = vllm_shared._shared_class(lora_class)
        layer.attach_basis(shard_bases(layer, bases), exact_lora=False)
        single = len(modules) == 1
        layer.set_lora(0, CORE_MARKER if single else [CORE_MARKER] * len(modules), cores[0] if single else cores)
        got = layer._apply_lora_to_output(x_here, torch.zeros_like(want))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        partials.append(got)
    if lora_class is lora_layers.RowParallelLinearWithLoRA:
        torch.testing.assert_close(sum(partials), x @ updates[0].T, rtol=1e-4, atol=1e-4)


def test_a_layer_whose_rank_holds_another_shape_than_its_basis_or_under_pipeline_parallelism_holds_no_cores(
        monkeypatch):
    for module in (linear, parameter):
        monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: 1)
        monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: 2)
    with set_current_vllm_config(VllmConfig()):
        layer = lora_layers.RowParallelLinearWithLoRA(RowParallelLinear(OUT, IN, **F32))
        layer.create_lora_weights(SLOTS, LoRAConfig(max_lora_rank=RANK, max_loras=SLOTS, lora_dtype=torch.float32))
    assert why_no_cores(layer, ["o"], [(torch.randn(IN, RANK), torch.randn(OUT, RANK))]) is None
    assert why_no_cores(layer, ["o"], [(torch.randn(IN + 8, RANK), torch.randn(OUT, RANK))]) == (
        "its slice for o is 32×24 on this rank, the basis of o 40×24 there")
    with set_current_vllm_config(VllmConfig(parallel_config=ParallelConfig(pipeline_parallel_size=2))):
        assert why_no_cores(layer, ["o"], [(torch.randn(IN, RANK), torch.randn(OUT, RANK))]) == (
            "pipeline parallel size 2 (cores are held without it)")
