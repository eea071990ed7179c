"""vLLM's LoRA layer extended to hold cores (`psoft_deploy.serve.vllm_shared`), in-process: the check of
the vLLM internals it relies on, and its forward compiled to one graph (no branch on what the slots hold,
no host sync). tests/test_serve_shared.py serves through real vLLM servers."""

import pytest
import torch
from vllm.config import LoRAConfig, VllmConfig, set_current_vllm_config
from vllm.lora.layers import ReplicatedLinearWithLoRA
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.model_executor import parameter
from vllm.model_executor.layers.linear import ReplicatedLinear

from psoft_deploy.serve import endpoint, vllm_shared
from psoft_deploy.serve.vllm_shared import CORE_MARKER, missing_internals

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
        layer = ReplicatedLinearWithLoRA(base)
        layer.create_lora_weights(SLOTS, LoRAConfig(max_lora_rank=RANK, max_loras=SLOTS, lora_dtype=torch.float32), None)
    layer.set_mapping(punica)
    U, V = torch.linalg.qr(torch.randn(OUT, RANK))[0], torch.linalg.qr(torch.randn(IN, RANK))[0]
    layer.__class__ = vllm_shared._shared_class(ReplicatedLinearWithLoRA)
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
