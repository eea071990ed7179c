"""PSOFT adapters as k×k cores over the base's shared basis: the projection pinned to PEFT's own ΔW for
every config variant, which adapters lie in the basis, and how serve chooses the form (no server
here; tests/test_serve_shared.py serves them through real vLLM)."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import VARIANTS, make_peft_adapter, peft_deltas
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from psoft_deploy.converters.lora_format import LoraAdapter
from psoft_deploy.converters.verify.tolerances import lora_in_basis_bound
from psoft_deploy.core.base import BaseCheckpoint, base_tensor_key
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.formats import read_adapter
from psoft_deploy.core.model import load_base_model
from psoft_deploy.core.psoft import core_in_basis, lora_of_core, shared_basis
from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.serve import cache as cache_module
from psoft_deploy.serve import shared
from psoft_deploy.serve.cache import LoraCache
from psoft_deploy.serve.forms import AdapterForms
from psoft_deploy.serve.plan import plan_serve
from psoft_deploy.serve.preflight import vllm_flag
from psoft_deploy.serve.shared import CoresEntry, SharedBasis

CORES_FILE = CoresEntry.FILE
from psoft_deploy.testing import build_tiny_model

BASIS_RANK = 64  # the largest rank among VARIANTS ("rank-full")
OUTSIDE = {"lowrank", "lowrank-pissa"}  # PEFT's randomized low-rank SVD: another basis


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so that each call is recorded (the work done); returns the record."""
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "base"
    build_tiny_model(path, "llama")
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cores_reproduce_peft_delta_weights_and_only_full_svd_adapters_lie_in_the_basis(base, tmp_path, variant):
    peft_model = make_peft_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    checkpoint = BaseCheckpoint(base)
    for module, delta in peft_deltas(peft_model).items():
        weight = checkpoint.tensor(base_tensor_key(module))
        U, V, S = shared_basis(weight, min(BASIS_RANK, *weight.shape))
        k = peft_model.peft_config["default"].r
        # PEFT's ΔW as a rank-k product in (out, in) layout: exact, so its residual is the basis's alone.
        U_d, S_d, Vh_d = torch.linalg.svd(delta.double())
        core, residual = core_in_basis(Vh_d[:k], U_d[:, :k] * S_d[:k], U[:, :k], V[:, :k])
        tolerance = lora_in_basis_bound(S, k, max(weight.shape))
        if variant in OUTSIDE:
            assert residual > 100 * tolerance, (module, residual, tolerance)
            continue
        assert residual <= tolerance, (module, residual, tolerance)
        rebuilt = U[:, :k].double() @ core.double() @ V[:, :k].double().T
        assert (rebuilt - delta.double()).norm() <= 2 * tolerance * delta.double().norm()
        # the exact LoRA a layer without cores gets, read off the pair
        lora_A, lora_B = lora_of_core(core, U, V)
        assert lora_A.shape == (k, weight.shape[1]) and lora_B.shape == (weight.shape[0], k)
        assert (lora_B.double() @ lora_A.double() - delta.double()).norm() <= 2 * tolerance * delta.double().norm()


@pytest.fixture(scope="module")
def full_basis(base, tmp_path_factory):
    """The basis every VARIANTS adapter lies in: all seven projections at BASIS_RANK."""
    checkpoint = BaseCheckpoint(base)
    modules = sorted(key.removesuffix(".weight") for key in checkpoint.files if key.endswith("_proj.weight"))
    return SharedBasis.build(tmp_path_factory.mktemp("basis"), checkpoint, modules, BASIS_RANK)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cores_straight_from_r_are_the_projection_of_pefts_delta_weights_without_an_svd(base, full_basis, tmp_path,
                                                                                         monkeypatch, variant):
    peft_model = make_peft_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    adapter = read_adapter(tmp_path / "adapter")
    svds = count_calls(monkeypatch, torch.linalg, "svd") + count_calls(monkeypatch, torch, "svd_lowrank")
    cores, why = full_basis.cores_from_rotations(adapter)
    assert not svds, "no SVD per adapter"
    if variant in OUTSIDE:
        assert cores is None and "full SVD" in why, why
        return
    assert cores is not None and "float32 noise off float64" in why, why
    monkeypatch.undo()
    for module, delta in peft_deltas(peft_model).items():
        (U, V), S = full_basis.vectors(module), full_basis.singular_values[module]
        k = cores[module].shape[0]
        U_d, S_d, Vh_d = torch.linalg.svd(delta.double())  # PEFT's ΔW, projected onto the basis
        projected, _ = core_in_basis(Vh_d[:k], U_d[:, :k] * S_d[:k], U[:, :k], V[:, :k])
        tolerance = lora_in_basis_bound(S, k, max(U.shape[0], V.shape[0]))
        error = (cores[module].double() - projected.double()).norm() / delta.double().norm()
        assert error <= tolerance, (module, float(error), tolerance)


def test_a_process_keeps_the_basis_once_where_it_serves_it(base, full_basis, tmp_path):
    """Cores from R and the projection of an exact LoRA read U and V from the basis's file at each use:
    besides what a vLLM layer holds (its own copy, in its serving dtype), the process keeps only the
    singular values."""
    make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    cores, _ = full_basis.cores_from_rotations(read_adapter(tmp_path / "adapter"))
    lora_dir, _ = LoraCache(tmp_path / "cache", BaseCheckpoint(str(base))).prepare(tmp_path / "adapter")
    projected, _ = full_basis.cores_of(lora_dir)
    assert cores is not None and projected is not None
    singular_values = {id(S) for S in full_basis.singular_values.values()}
    held = [t for t in reachable_tensors(full_basis) if id(t) not in singular_values]
    assert held == [], [tuple(t.shape) for t in held]
    module = next(iter(full_basis.singular_values))
    # the control: a basis kept anywhere is seen (the dataclass is frozen: planted past its __setattr__)
    object.__setattr__(full_basis, "planted", {"kept": [full_basis.vectors(module)]})
    try:
        assert len(reachable_tensors(full_basis)) == len(singular_values) + 2
    finally:
        object.__delattr__(full_basis, "planted")


def reachable_tensors(root) -> list[torch.Tensor]:
    """Every tensor ``root`` holds, at any depth of its attributes, containers and nested objects
    (classes, modules and functions aside)."""
    import gc
    import types

    skipped = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, found, todo = set(), [], [root]
    while todo:
        value = todo.pop()
        if id(value) in seen or isinstance(value, skipped):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(value)
        else:
            todo.extend(gc.get_referents(value))
    return found


def test_a_core_from_r_that_is_not_finite_is_not_served(base, full_basis, tmp_path):
    make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    adapter = read_adapter(tmp_path / "adapter")
    next(iter(adapter.modules.values())).generator[0] = float("nan")
    cores, why = full_basis.cores_from_rotations(adapter)
    assert cores is None and "off the float64 closed form" in why, why


def test_an_adapter_of_another_base_is_refused_in_one_line_before_its_cores(base, tmp_path, monkeypatch):
    other = tmp_path / "other-base"
    build_tiny_model(other, "llama", seed=5)
    make_peft_adapter(other, tmp_path / "foreign", target_modules=["q_proj", "v_proj"])
    checkpoint = BaseCheckpoint(base)
    basis = SharedBasis.build(tmp_path / "cache", checkpoint, [m for m in read_adapter(tmp_path / "foreign").modules], 4)
    forms = AdapterForms(LoraCache(tmp_path / "cache", checkpoint), basis)
    cores = count_calls(monkeypatch, SharedBasis, "cores_from_rotations")
    with pytest.raises(UserError, match="holds other weights") as refused:
        forms.prepare(tmp_path / "foreign")
    assert "\n" not in str(refused.value) and not cores


def test_a_basis_that_is_not_the_weights_singular_vectors_is_refused():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    U, V, S = shared_basis(weight, 8)
    shared.check_basis("m", weight, U, V, S)
    with pytest.raises(UserError, match="not the weight's singular vectors"):
        shared.check_basis("m", weight, U[:, torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])], V, S)


def test_shared_form_keeps_psoft_adapters_and_refuses_others_in_one_reason(base, tmp_path, monkeypatch):
    checkpoint = BaseCheckpoint(base)
    cache = LoraCache(tmp_path / "cache", checkpoint)
    make_peft_adapter(base, tmp_path / "psoft", r=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(base, tmp_path / "lowrank", r=8, target_modules=["q_proj", "v_proj"], **VARIANTS["lowrank"])
    make_peft_adapter(base, tmp_path / "wide", r=16, psoft_alpha=16, target_modules=["q_proj", "o_proj"])
    lora = get_peft_model(load_base_model(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    psoft_dir, _ = cache.prepare(tmp_path / "psoft")
    modules = LoraAdapter.read(psoft_dir).modules
    svds, projections = count_calls(monkeypatch, shared, "shared_basis"), count_calls(monkeypatch, SharedBasis, "cores_of")
    basis = SharedBasis.build(tmp_path / "cache", checkpoint, modules, 8)
    assert len(svds) == len(modules)
    assert SharedBasis.build(tmp_path / "cache", checkpoint, modules, 8) == basis
    assert len(svds) == len(modules), "the basis is computed once"

    cores, why = basis.shared_form(psoft_dir, tmp_path / "cache")
    assert cores is not None and "float32 noise" in why and len(projections) == 1
    assert basis.shared_form(psoft_dir, tmp_path / "cache") == (cores, why)
    assert len(projections) == 1, "the cores are projected once"
    for name, reason in (("lowrank", "> float32 noise"), ("lora", "> float32 noise"), ("wide", "outside the basis")):
        lora_dir, _ = cache.prepare(tmp_path / name)
        cores, why = basis.shared_form(lora_dir, tmp_path / "cache")
        assert cores is None and reason in why, (name, why)



def test_a_subspace_the_weight_does_not_determine_gives_no_allowance():
    """A rank-2 weight's singular vectors past 2 are any of its null space: an adapter built on other
    null vectors is not in the basis, however small the (float32 noise) gap past them."""
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(64, 2, generator=generator), torch.randn(2, 48, generator=generator)
    U, V, S = shared_basis(left @ right, 4)
    tolerance = lora_in_basis_bound(S, 4, 64)
    assert tolerance < 1e-4, tolerance  # the SVD's backward error alone, not σ₁ / (a gap of rounding noise)
    other_U = torch.linalg.qr(torch.cat([U[:, :2], torch.randn(64, 2, generator=generator)], dim=1)).Q
    other_V = torch.linalg.qr(torch.cat([V[:, :2], torch.randn(48, 2, generator=generator)], dim=1)).Q
    core = torch.randn(4, 4, generator=generator)
    _, residual = core_in_basis(other_V.T, other_U @ core, U, V)
    assert residual > 100 * tolerance, (residual, tolerance)
    _, residual = core_in_basis(V.T, U @ core, U, V)  # the same vectors: in the basis
    assert residual <= tolerance, (residual, tolerance)

def _plan(base, tmp_path, adapters, *vllm_args, form="auto"):
    return plan_serve(str(base), adapters, adapter_root=None, host="127.0.0.1", port=1, cache_dir=tmp_path / "cache",
                      vllm_args=vllm_args, cpu=True, free_bytes=8 * 10**9, adapter_form=form)


@pytest.fixture(scope="module")
def demo_adapters(tmp_path_factory):
    work = tmp_path_factory.mktemp("plan")
    build_tiny_model(work / "base", "llama", **MODEL_SIZES)
    make_peft_adapter(work / "base", work / "a", r=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(work / "base", work / "b", r=4, seed=2, target_modules=["q_proj", "v_proj"], **VARIANTS["pissa"])
    make_peft_adapter(work / "base", work / "low", r=8, seed=3, target_modules=["q_proj"], **VARIANTS["lowrank"])
    return work / "base", {name: str(work / name) for name in ("a", "b", "low")}


def test_serve_says_which_adapters_share_the_basis_and_gives_vllm_their_cores(demo_adapters, tmp_path, caplog):
    base, adapters = demo_adapters
    with caplog.at_level("INFO", logger="psoft_deploy"):
        plan = _plan(base, tmp_path, adapters)
    lines = [record.getMessage() for record in caplog.records if "shared basis" in record.getMessage()]
    assert len(lines) == 1 and "as cores: a, b; exact LoRA: low (residual" in lines[0], lines
    assert plan.env["PSOFT_DEPLOY_SHARED_BASIS"].endswith("basis.safetensors")
    assert plan.served["a"].name.startswith("cores-") and plan.served["b"].name.startswith("cores-")
    assert not plan.served["low"].name.startswith("cores-")
    assert plan.served[str(base)].name.startswith("cores-zero-")  # the bare base, on CPU
    assert int(vllm_flag(plan.command, "--max-cpu-loras")) >= len(plan.served)
    cores_only = _plan(base, tmp_path, {name: adapters[name] for name in ("a", "b")})
    assert "PSOFT_DEPLOY_REQUIRE_CORES" not in cores_only.env
    # vLLM's workers refuse, on load, an adapter whose layers they cannot all hold as cores
    required = _plan(base, tmp_path, {name: adapters[name] for name in ("a", "b")}, form="shared")
    assert required.env["PSOFT_DEPLOY_REQUIRE_CORES"] == "1"

    plan = _plan(base, tmp_path, adapters, form="lora")
    assert "PSOFT_DEPLOY_SHARED_BASIS" not in plan.env and not any(p.name.startswith("cores-") for p in plan.served.values())
    with pytest.raises(UserError, match=r"--adapter-form shared: adapter low is not in the base's shared basis"):
        _plan(base, tmp_path, adapters, form="shared")


def test_the_basis_holds_the_only_svds_one_per_adapted_weight_for_every_adapter(demo_adapters, tmp_path, monkeypatch):
    """PEFT adapters' cores come from R over the basis: planning two of them runs one SVD per adapted
    weight (the basis's), not one per adapter and weight; the next start, from the cache, runs none."""
    base, adapters = demo_adapters
    svds = count_calls(monkeypatch, torch.linalg, "svd")
    plan = _plan(base, tmp_path, {name: adapters[name] for name in ("a", "b")})
    assert all(plan.served[name].name.startswith("cores-") for name in ("a", "b"))
    assert len(svds) == 4  # q_proj and v_proj of two layers
    svds.clear()
    _plan(base, tmp_path, {name: adapters[name] for name in ("a", "b")})
    assert svds == []


def test_without_the_vllm_internals_every_adapter_is_exact_lora(demo_adapters, tmp_path, caplog, monkeypatch):
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    base, adapters = demo_adapters
    reason = "vLLM's BaseLinearLayerWithLoRA._apply_lora_to_output is gone"
    # another vLLM release: the layer hook the extension relies on is missing
    monkeypatch.delattr(BaseLinearLayerWithLoRA, "_apply_lora_to_output")
    plan = _plan(base, tmp_path, adapters)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(line.startswith("warning: every adapter is served as exact LoRA: ") and reason in line
               for line in warnings), warnings
    assert "PSOFT_DEPLOY_SHARED_BASIS" not in plan.env
    assert not any(path.name.startswith("cores-") for path in plan.served.values())
    with pytest.raises(UserError, match=re.escape(f"--adapter-form shared: {reason}")):
        _plan(base, tmp_path, adapters, form="shared")


def truncate(file):
    file.write_bytes(file.read_bytes()[:-16])


def test_cache_entries_that_do_not_read_back_are_built_again(demo_adapters, tmp_path, caplog, monkeypatch):
    base, adapters = demo_adapters
    two = {"a": adapters["a"], "low": adapters["low"]}  # cores from R; an exact LoRA conversion
    plan = _plan(base, tmp_path, two)
    cores_dir, lora_dir = plan.served["a"], plan.served["low"]
    assert cores_dir.name.startswith("cores-") and (lora_dir / cache_module.EXPORT_META).is_file()
    conversions = count_calls(monkeypatch, cache_module, "derive_factors")
    computed = count_calls(monkeypatch, shared, "core_of_rotation")  # every module at once, in float32 and float64
    once = 2
    assert _plan(base, tmp_path, two).served == plan.served and not conversions and not computed  # reused

    truncate(cores_dir / CORES_FILE)  # a disk that filled, a copy cut short
    truncate(lora_dir / "adapter_model.safetensors")
    with caplog.at_level("WARNING", logger="psoft_deploy"):
        again = _plan(base, tmp_path, two)
    assert again.served == plan.served
    assert len(conversions) == 1 and len(computed) == once, "each broken entry is built again, once"
    warnings = [record.getMessage() for record in caplog.records if "does not read back" in record.getMessage()]
    assert len(warnings) == 2 and all("building it again" in line for line in warnings), warnings
    with safe_open(cores_dir / CORES_FILE, framework="pt") as handle:
        assert set(handle.keys()) == set(read_adapter(adapters["a"]).modules)

    cores = load_file(cores_dir / CORES_FILE)  # a core missing, in a file that reads
    save_file(dict(list(cores.items())[1:]), cores_dir / CORES_FILE)
    assert _plan(base, tmp_path, two).served == plan.served and len(computed) == 2 * once
    assert load_file(cores_dir / CORES_FILE).keys() == cores.keys()


def test_an_arriving_adapter_outside_the_basis_is_refused_in_one_line_where_only_cores_are_served(demo_adapters,
                                                                                                 tmp_path):
    from psoft_deploy.serve.resolver import PsoftResolver

    base, adapters = demo_adapters
    plan = _plan(base, tmp_path, {"a": adapters["a"]}, form="shared")
    basis = Path(plan.env["PSOFT_DEPLOY_SHARED_BASIS"])
    for require_cores in (False, True):
        resolver = PsoftResolver(Path(adapters["a"]).parent, str(base), tmp_path / "cache", 64, basis, require_cores)
        assert resolver.prepare(Path(adapters["b"]))[0].name.startswith("cores-")
        if not require_cores:
            assert not resolver.prepare(Path(adapters["low"]))[0].name.startswith("cores-")  # exact LoRA
            continue
        refused = r"low is not in the base's shared basis \(residual .*\(--adapter-form shared\)"
        with pytest.raises(UserError, match=refused):
            resolver.prepare(Path(adapters["low"]))


def test_an_adapter_root_gets_a_basis_for_its_adapters_and_a_slot_per_sequence(demo_adapters, tmp_path, caplog):
    base, adapters = demo_adapters

    def plan(root, **basis):
        return plan_serve(str(base), {}, adapter_root=str(root), host="127.0.0.1", port=1, cache_dir=tmp_path / "cache",
                          vllm_args=("--max-num-seqs", "32"), cpu=True, free_bytes=8 * 10**9, **basis)

    for name in ("root", "chosen", "empty"):
        (tmp_path / name).mkdir()
    shutil.copytree(adapters["a"], tmp_path / "root" / "a")  # r 8 on q_proj, v_proj
    found = plan(tmp_path / "root")
    basis = SharedBasis(Path(found.env["PSOFT_DEPLOY_SHARED_BASIS"]))
    assert basis.rank == 8 and basis.modules == set(read_adapter(adapters["a"]).modules)
    assert vllm_flag(found.command, "--max-loras") == "32"  # a slot per sequence in a batch
    assert int(vllm_flag(found.command, "--max-lora-rank")) >= 64  # exact LoRA arrivals

    basis = SharedBasis(Path(plan(tmp_path / "chosen", basis_rank=4, basis_modules=("q_proj",))
                             .env["PSOFT_DEPLOY_SHARED_BASIS"]))
    q_projs = {key.removesuffix(".weight") for key in BaseCheckpoint(base).files if key.endswith(".q_proj.weight")}
    assert basis.rank == 4 and basis.modules == q_projs
    with caplog.at_level("WARNING", logger="psoft_deploy"):
        empty = plan(tmp_path / "empty")
    assert "PSOFT_DEPLOY_SHARED_BASIS" not in empty.env
    assert any("--basis-rank K --basis-modules" in record.getMessage() for record in caplog.records)
