"""Generate PSOFT adapter fixtures written by real PEFT releases.

The fixtures under this directory are committed so that tests can check that
psoft-deploy reads adapters produced by several PEFT versions, without needing
those PEFT versions installed.

Layout (relative to OUT_DIR, which defaults to this script's directory)::

    base/                          tiny random LlamaForCausalLM (shared by all versions)
    <peft version>/<variant>/      adapter_config.json + adapter_model.safetensors
                                   + expected.safetensors (see below)

Variants (all: target_modules=["q_proj", "v_proj", "down_proj"] unless said,
r=4, psoft_alpha=8, init_weights=False, task_type="CAUSAL_LM"):

    full_psoft          psoft_svd="full",    ab_svd_init="psoft_init"
    full_pissa_neumann  psoft_svd="full",    ab_svd_init="pissa_init",
                        use_cayley_neumann=True, num_cayley_neumann_terms=4,
                        psoft_mag_a=False
    lowrank_psoft       psoft_svd="lowrank", psoft_svd_lowrank_niter=4
                        (+ random_seed=7 if the PEFT version's PsoftConfig has
                        a ``random_seed`` field; PEFT 0.19.0 does not, so its
                        lowrank A/B come from the unseeded global RNG and
                        cannot be rebuilt exactly on load - that is intended)
    regex_layers        psoft_svd="full", target_modules=r".*\\.(q_proj|v_proj)",
                        layers_to_transform=[0]; skipped, with a line, by the
                        releases that refuse it (all through 0.22.0: 0.22 moved
                        the check from PsoftConfig to PeftConfig)

expected.safetensors holds, computed with the PEFT version that wrote the
adapter:

    input_ids                 int64 (2, 7), fixed (seeded randint in [0, 64))
    logits                    float32 (2, 7, 64), PeftModel forward, eval mode
    delta.<module name>       float32, ``layer.get_delta_weight("default")`` for
                              each targeted module; <module name> is the name in
                              the *base* model, e.g. model.layers.0.self_attn.q_proj

The "trained" adapter parameters are set deterministically after
get_peft_model: torch.manual_seed(1), then for each psoft_R module in
named_modules() order: weight = 0.1 * randn (the strict upper triangle vector,
since psoft_orth=True), then vector_b, vector_a (if present) = 1 + 0.05 * randn.
The global RNG is seeded with 1234 right before get_peft_model so that a rerun
under the same PEFT/torch version reproduces the files (this seed is what the
unseeded PEFT 0.19.0 lowrank SVD ends up consuming; it is unrelated to
PsoftConfig.random_seed).

How to rerun (from the repository root). PEFT 0.22.0 is the installed one; the
older releases were unpacked from their wheels into /tmp/peftXXX
(``pip download peft==0.19.0 --no-deps`` then unzip the wheel) and put first on
PYTHONPATH. Output always goes to OUT_DIR/<peft.__version__>/; pass
--expect-version to abort if the wrong PEFT got imported::

    PYTHONPATH=/tmp/peft019 python tests/data/peft_versions/make_fixtures.py --expect-version 0.19.0
    PYTHONPATH=/tmp/peft020 python tests/data/peft_versions/make_fixtures.py --expect-version 0.20.0
    PYTHONPATH=/tmp/peft021 python tests/data/peft_versions/make_fixtures.py --expect-version 0.21.2
    python tests/data/peft_versions/make_fixtures.py --expect-version 0.22.0

The base model is loaded via the relative path "base" (the script chdirs into
OUT_DIR), so adapter_config.json records base_model_name_or_path="base" instead
of an absolute path of the generating machine. The auto-generated README.md
model card is deleted; adapter_config.json and adapter_model.safetensors are
exactly what PEFT's save_pretrained wrote.

``base/`` is only created when it does not exist yet, so all versions share the
identical base model. Delete ``base/`` *and* all version directories to start
over. Existing variant directories of the running version are overwritten.

Check how the installed PEFT reloads every version's adapters (prints the max
abs difference between reloaded and saved logits / delta weights)::

    python tests/data/peft_versions/make_fixtures.py --check

The script re-executes itself with PYTHONHASHSEED=0 (PEFT keeps target_modules
as a set, so its order in adapter_config.json would otherwise vary per run).
With that, reruns reproduce all files byte for byte.

Generated with torch 2.13.0+cpu and transformers 5.19.0 (0.22.0: transformers 5.19.x as
README's install resolves it on 2026-12-07).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

BASE_DIRNAME = "base"
TARGET_MODULES = ["q_proj", "v_proj", "down_proj"]
GETPEFT_SEED = 1234
TRAIN_SEED = 1
INPUT_SEED = 2

VARIANTS = {
    "full_psoft": dict(psoft_svd="full", ab_svd_init="psoft_init"),
    "full_pissa_neumann": dict(
        psoft_svd="full",
        ab_svd_init="pissa_init",
        use_cayley_neumann=True,
        num_cayley_neumann_terms=4,
        psoft_mag_a=False,
    ),
    "lowrank_psoft": dict(psoft_svd="lowrank", psoft_svd_lowrank_niter=4),
    # a regex target_modules with layers_to_transform: every release through 0.22.0 refuses it (0.22 moved the
    # check from PsoftConfig to PeftConfig); written by the first release that accepts it
    "regex_layers": dict(psoft_svd="full", ab_svd_init="psoft_init", target_modules=r".*\.(q_proj|v_proj)",
                         layers_to_transform=[0]),
}
LOWRANK_RANDOM_SEED = 7


def make_input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randint(0, 64, (2, 7), generator=g, dtype=torch.int64)


def build_base(base_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(base_dir, safe_serialization=True)
    print(f"wrote base model to {base_dir}")


def load_base(base_dir: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    return model


def psoft_layers(peft_model):
    """(base-model module name, PsoftLayer) for every PSOFT-wrapped module."""
    from peft.tuners.psoft.layer import PsoftLayer

    prefix = "base_model.model."
    out = []
    for name, module in peft_model.named_modules():
        if isinstance(module, PsoftLayer):
            assert name.startswith(prefix), name
            out.append((name[len(prefix) :], module))
    return out


def set_trained_params(peft_model) -> None:
    torch.manual_seed(TRAIN_SEED)
    with torch.no_grad():
        for _, layer in psoft_layers(peft_model):
            orth = layer.psoft_R["default"]
            orth.weight.copy_(torch.randn_like(orth.weight) * 0.1)
            for vec in (orth.vector_b, orth.vector_a):
                if vec is not None:
                    vec.copy_(1.0 + 0.05 * torch.randn_like(vec))


def compute_expected(peft_model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=input_ids).logits.to(torch.float32)
        tensors = {"input_ids": input_ids.clone(), "logits": logits.contiguous()}
        for name, layer in psoft_layers(peft_model):
            tensors[f"delta.{name}"] = layer.get_delta_weight("default").to(torch.float32).contiguous()
    return tensors


def generate(out_dir: str, expect_version: str | None) -> None:
    import peft
    from peft import PsoftConfig, get_peft_model
    from safetensors.torch import save_file

    version = peft.__version__
    print(f"peft {version} from {peft.__file__}")
    if expect_version is not None and version != expect_version:
        sys.exit(f"expected peft {expect_version}, got {version} - check PYTHONPATH")

    # Work relative to out_dir so that the recorded base_model_name_or_path is just "base".
    os.chdir(out_dir)
    out_dir = "."
    base_dir = BASE_DIRNAME
    if not os.path.isdir(base_dir):
        build_base(base_dir)
    else:
        print(f"reusing existing base model at {base_dir}")

    has_seed_field = "random_seed" in {f.name for f in dataclasses.fields(PsoftConfig)}
    input_ids = make_input_ids()

    for variant, extra in VARIANTS.items():
        kwargs = dict(task_type="CAUSAL_LM", target_modules=list(TARGET_MODULES), r=4, psoft_alpha=8,
                      init_weights=False) | extra
        if extra.get("psoft_svd") == "lowrank" and has_seed_field:
            kwargs["random_seed"] = LOWRANK_RANDOM_SEED
        try:
            config = PsoftConfig(**kwargs)
        except ValueError as error:
            print(f"skipped {variant}: PEFT {version} refuses it ({error})")
            continue

        base = load_base(base_dir)
        torch.manual_seed(GETPEFT_SEED)
        model = get_peft_model(base, config)
        set_trained_params(model)
        expected = compute_expected(model, input_ids)

        vdir = os.path.join(out_dir, version, variant)
        os.makedirs(vdir, exist_ok=True)
        model.save_pretrained(vdir)
        # Drop the auto-generated model card boilerplate (~5 KB each, carries nothing we test).
        readme = os.path.join(vdir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        with open(os.path.join(vdir, "adapter_config.json")) as f:
            cfg = json.load(f)
        save_file(expected, os.path.join(vdir, "expected.safetensors"), metadata={"peft_version": version})
        print(
            f"wrote {vdir}: peft_version in config={'peft_version' in cfg}, "
            f"random_seed={cfg.get('random_seed', '<absent>')}"
        )


def check(out_dir: str) -> None:
    """Reload every version's adapters with the installed PEFT and compare to expected.safetensors."""
    import peft
    from peft import PeftModel
    from safetensors.torch import load_file

    print(f"checking with peft {peft.__version__}")
    base_dir = os.path.join(out_dir, BASE_DIRNAME)
    for version in sorted(d for d in os.listdir(out_dir) if d[:1].isdigit()):
        for variant in sorted(os.listdir(os.path.join(out_dir, version))):
            vdir = os.path.join(out_dir, version, variant)
            expected = load_file(os.path.join(vdir, "expected.safetensors"))
            model = PeftModel.from_pretrained(load_base(base_dir), vdir)
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=expected["input_ids"]).logits
                logit_diff = (logits - expected["logits"]).abs().max().item()
                delta_diff = max(
                    (layer.get_delta_weight("default") - expected[f"delta.{name}"]).abs().max().item()
                    for name, layer in psoft_layers(model)
                )
            print(f"{version:>8} {variant:<20} max|dlogits|={logit_diff:.3e}  max|ddelta|={delta_diff:.3e}")


def main() -> None:
    # PEFT stores target_modules as a set, so the order written to adapter_config.json depends on string
    # hashing. Re-exec with a fixed hash seed so that reruns are byte-identical.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--expect-version", help="abort unless peft.__version__ equals this")
    parser.add_argument("--check", action="store_true", help="reload all fixtures with the installed peft")
    args = parser.parse_args()
    if args.check:
        check(args.out_dir)
    else:
        generate(args.out_dir, args.expect_version)


if __name__ == "__main__":
    main()
