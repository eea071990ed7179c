"""`psoft-deploy train --jobs`: many adapters of one base trained in one run, each equal to its run alone, each
written when it ends; bad jobs refused before anything is written."""

import json
from pathlib import Path

import pytest
import torch
from helpers import run, torchrun

from psoft_deploy import train_jobs
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.layer import PsoftJobsLinear, PsoftLinear, PsoftRotation
from psoft_deploy.core.psoft import ModuleFactors, RotationSpec, SubspaceSpec, principal_subspace, singular_triplets
from psoft_deploy.testing import bundled_text

TARGETS = ["q_proj", "v_proj", "down_proj"]


def common(base, *extra):
    return ["train", "--base_model_name_or_path", base, "--max_length", 64, "--per_device_train_batch_size", 4,
            "--learning_rate", 2e-2, "--r", 8, "--psoft_alpha", 8, "--target_modules", *TARGETS, "--logging_steps", 2,
            "--save_steps", 1000, *extra]


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


@pytest.fixture
def datasets(tmp_path) -> list[Path]:
    """Four data files of other examples each: the first 2 to 11 words of bundled sentences, so that batches of
    different jobs have different lengths (and padding); the last holds 10 examples, the others 24."""
    lines = [line.split() for line in bundled_text()]
    paths = []
    for i, count in enumerate([24, 24, 24, 10]):
        paths.append(tmp_path / f"data{i}.txt")
        examples = [" ".join(lines[(7 * k + 11 * i) % len(lines)][:2 + (5 * k + 3 * i) % 10]) for k in range(count)]
        paths[-1].write_text("\n".join(examples) + "\n")
    return paths


def delta_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return {name: module.delta_weight() for name, module in load_factors(str(adapter), str(base)).modules.items()}


def listing(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float(torch.linalg.norm(a[name] - b[name]) / torch.linalg.norm(b[name])) for name in b)


@pytest.mark.parametrize("init", ["psoft_init", "pissa_init"])
def test_one_forward_routes_each_row_through_its_own_job_as_psoft_linear_alone(init):
    """Rows of three jobs (ranks 6, 3 and 6, other scales, trained-like R) through one `PsoftJobsLinear` equal each
    job's own `PsoftLinear` (A, B of its rank and scale from its own SVD), forward and gradients."""
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False)
    spec, rotation_spec = SubspaceSpec(init=init), RotationSpec()
    ranks, scales = [6, 3, 6], [1.0, 2.5, 0.5]
    rotations = [PsoftRotation(r, rotation_spec) for r in ranks]
    with torch.no_grad():
        for rotation in rotations:
            for parameter in rotation.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    rows = [2, 1, 3]
    layer = PsoftJobsLinear(base, singular_triplets(base.weight.detach(), max(ranks), spec), init, rotations, rows)
    x = torch.randn(sum(rows), 5, 24, generator=generator)
    together = layer(x)
    together.square().sum().backward()
    ours = [[p.grad.clone() for p in rotation.parameters()] for rotation in rotations]
    for rotation in rotations:
        rotation.zero_grad()
    start = 0
    for index, (r, scale, rotation, count) in enumerate(zip(ranks, scales, rotations, rows)):
        A, B = principal_subspace(base.weight.detach(), r, scale, spec)
        alone = PsoftLinear(base, ModuleFactors(A=A, B=B, R=torch.eye(r), scale=scale), rotation=rotation)
        expected = alone(x[start:start + count])
        torch.testing.assert_close(together[start:start + count], expected, rtol=1e-5, atol=1e-6)
        expected.square().sum().backward()
        for got, want in zip(ours[index], rotation.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-6)
        saved = layer.job(index, scale)  # what the job writes: its rank's and scale's A, B, bit for bit
        assert torch.equal(saved.A, alone.A) and torch.equal(saved.B, alone.B) and saved.scale == scale
        start += count


def test_four_jobs_together_equal_each_trained_alone(tiny_base, datasets, tmp_path):
    """Four jobs (their own data, two ranks, scales, seeds and learning rates; the last with 10 examples runs
    through 4 epochs, reshuffled) with gradient accumulation: 10 steps in one run (all jobs in one forward, or 3
    a forward) equal each job's run alone."""
    base = tiny_base("llama")
    jobs = [{"name": "a", "data_path": str(datasets[0])},
            {"name": "b", "data_path": str(datasets[1]), "r": 4, "psoft_alpha": 16, "seed": 7},
            {"name": "c", "data_path": str(datasets[2]), "learning_rate": 1e-2},
            {"name": "d", "data_path": str(datasets[3]), "r": 4, "seed": 3}]
    shared = common(base, "--max_steps", 10, "--gradient_accumulation_steps", 2, "--per_device_train_batch_size", 2)
    write_jobs(tmp_path / "jobs.jsonl", jobs)
    together = run(*shared, "--jobs", tmp_path / "jobs.jsonl", "--output_dir", tmp_path / "together")
    assert together.exit_code == 0, together.output
    grouped = run(*shared, "--jobs", tmp_path / "jobs.jsonl", "--jobs_per_forward", 3, "--output_dir", tmp_path / "3")
    assert grouped.exit_code == 0, grouped.output
    deltas = {}
    for job in jobs:
        options = [item for key, value in job.items() if key != "name" for item in (f"--{key}", value)]
        alone = run(*shared, *options, "--output_dir", tmp_path / "alone" / job["name"])
        assert alone.exit_code == 0, alone.output
        deltas[job["name"]] = delta_weights(base, tmp_path / "together" / job["name"])
        alone_delta = delta_weights(base, tmp_path / "alone" / job["name"])
        assert relative(deltas[job["name"]], alone_delta) <= 1e-4
        assert relative(delta_weights(base, tmp_path / "3" / job["name"]), alone_delta) <= 1e-4  # forwards of 3 and 1
        summary, alone_summary = (json.loads((tmp_path / side / job["name"] / "training_summary.json").read_text())
                                  for side in ("together", "alone"))
        assert summary["steps"] == 10 and len(summary["loss_history"]) == 5
        assert summary["loss_history"] == pytest.approx(alone_summary["loss_history"], rel=1e-5)
        assert summary["arguments"] == alone_summary["arguments"] | {"output_dir": str(tmp_path / "together" /
                                                                                      job["name"])}
        assert listing(tmp_path / "together" / job["name"]) == listing(tmp_path / "alone" / job["name"])
    assert min(relative(deltas[x], deltas[y]) for x, y in (("a", "c"), ("b", "d"))) > 0.1  # the jobs differ


def test_by_default_a_forward_holds_four_jobs_at_most(tiny_base, datasets, tmp_path, monkeypatch):
    """Without --jobs_per_forward, five jobs take a forward of four and one of one (the activations a forward holds,
    and so the run's memory, grow with its jobs)."""
    forwards, forward_backward = [], train_jobs.forward_backward

    def recording(model, jobs, *args):
        forwards.append([job.name for job in jobs])
        return forward_backward(model, jobs, *args)

    monkeypatch.setattr(train_jobs, "forward_backward", recording)
    jobs = [{"name": f"job{i}", "data_path": str(datasets[i % 3])} for i in range(5)]
    result = run(*common(tiny_base("llama"), "--max_steps", 1), "--jobs", write_jobs(tmp_path / "jobs.jsonl", jobs),
                 "--output_dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert forwards == [["job0", "job1", "job2", "job3"], ["job4"]]


def test_a_job_that_ends_earlier_is_written_when_it_ends(tiny_base, datasets, tmp_path, monkeypatch):
    base = tiny_base("llama")
    steps_done, written = [0], {}

    class Counter:
        def update(self, count=1):
            steps_done[0] += count

        def close(self):
            pass

    save_outputs = train_jobs.save_outputs

    def recording(output, *args, **kwargs):
        written[output.name] = steps_done[0]
        save_outputs(output, *args, **kwargs)

    monkeypatch.setattr(train_jobs, "track", lambda **kwargs: Counter())
    monkeypatch.setattr(train_jobs, "save_outputs", recording)
    jobs = [{"name": "long", "data_path": str(datasets[0])},
            {"name": "short", "data_path": str(datasets[1]), "max_steps": 2},
            {"name": "epoch", "data_path": str(datasets[2]), "max_steps": -1, "num_train_epochs": 1}]  # 24 / 4 steps
    result = run(*common(base, "--max_steps", 8), "--jobs", write_jobs(tmp_path / "jobs.jsonl", jobs), "--output_dir",
                 tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert written == {"short": 2, "epoch": 6, "long": 8}, written
    for name, steps in written.items():
        assert json.loads((tmp_path / "out" / name / "training_summary.json").read_text())["steps"] == steps


def test_a_job_whose_loss_is_not_finite_stops_alone(tiny_base, datasets, tmp_path, caplog):
    jobs = [{"name": "fine", "data_path": str(datasets[0])},
            {"name": "diverges", "data_path": str(datasets[1]), "learning_rate": 1e30}]
    with caplog.at_level("INFO", logger="psoft_deploy"):
        result = run(*common(tiny_base("llama"), "--max_steps", 4), "--jobs",
                     write_jobs(tmp_path / "jobs.jsonl", jobs), "--output_dir", tmp_path / "out")
    assert result.exit_code == 1, result.output
    stopped = [record.getMessage() for record in caplog.records if "stopped at step" in record.getMessage()]
    assert len(stopped) == 1 and "'diverges'" in stopped[0] and "not finite" in stopped[0], stopped
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: 1 of 2 jobs stopped") and "Traceback" not in result.output, lines
    assert json.loads((tmp_path / "out" / "fine" / "training_summary.json").read_text())["steps"] == 4
    assert not (tmp_path / "out" / "diverges").exists()


@pytest.mark.slow
def test_two_jobs_under_torchrun_equal_each_trained_alone_under_torchrun(tiny_base, datasets, tmp_path):
    """Two processes (gloo): each job's shard, loss scaling and averaged gradients are those of its own run of two
    processes (DDP), with gradient accumulation and a reshuffled second epoch; only the first process writes."""
    base = tiny_base("llama")
    jobs = [{"name": "a", "data_path": str(datasets[0])},
            {"name": "b", "data_path": str(datasets[1]), "r": 4, "psoft_alpha": 16, "seed": 7}]
    shared = common(base, "--max_steps", 6, "--gradient_accumulation_steps", 2, "--per_device_train_batch_size", 2)
    write_jobs(tmp_path / "jobs.jsonl", jobs)
    # "--": torchrun's own parser would take --r for an abbreviation of its options
    together = torchrun("-m", "psoft_deploy", "--", *shared, "--jobs", tmp_path / "jobs.jsonl", "--output_dir",
                        tmp_path / "together")
    assert together.returncode == 0, together.stderr[-3000:]
    deltas = {}
    for job in jobs:
        options = [item for key, value in job.items() if key != "name" for item in (f"--{key}", value)]
        alone = torchrun("-m", "psoft_deploy", "--", *shared, *options, "--output_dir",
                         tmp_path / "alone" / job["name"])
        assert alone.returncode == 0, alone.stderr[-3000:]
        deltas[job["name"]] = delta_weights(base, tmp_path / "together" / job["name"])
        assert relative(deltas[job["name"]], delta_weights(base, tmp_path / "alone" / job["name"])) <= 1e-4
        summary, alone_summary = (json.loads((tmp_path / side / job["name"] / "training_summary.json").read_text())
                                  for side in ("together", "alone"))
        assert summary["processes"] == 2 and summary["steps"] == 6 and len(summary["loss_history"]) == 3
        assert summary["loss_history"] == pytest.approx(alone_summary["loss_history"], rel=1e-5)
        assert listing(tmp_path / "together" / job["name"]) == listing(tmp_path / "alone" / job["name"])
    assert relative(deltas["a"], deltas["b"]) > 0.1  # the jobs differ far more
    assert "trained adapters" in together.stdout


def test_a_job_whose_loss_is_not_finite_in_another_process_stops_in_this_one_too(tiny_base, datasets, tmp_path,
                                                                                caplog, monkeypatch):
    """The stop is decided by all processes together (a maximum over them): here a stand-in for a second process
    whose loss of job 'b' is not finite from its second step on, while this process's own is finite."""
    from accelerate import Accelerator

    forwards = []

    def reduce(self, tensor, reduction="mean", scale=1.0):
        if reduction != "max":
            return tensor.clone()
        forwards.append(tensor.clone())
        other = torch.tensor([0.0, float(len(forwards) >= 2)])[:len(tensor)]  # jobs a, b in one forward
        return torch.maximum(tensor, other)

    monkeypatch.setattr(Accelerator, "reduce", reduce)
    jobs = [{"name": "a", "data_path": str(datasets[0])}, {"name": "b", "data_path": str(datasets[1])}]
    with caplog.at_level("INFO", logger="psoft_deploy"):
        result = run(*common(tiny_base("llama"), "--max_steps", 4), "--jobs",
                     write_jobs(tmp_path / "jobs.jsonl", jobs), "--output_dir", tmp_path / "out")
    assert result.exit_code == 1 and "1 of 2 jobs stopped" in result.output, result.output
    assert [forward.tolist() for forward in forwards] == [[0.0, 0.0], [0.0, 0.0], [0.0], [0.0]]  # finite here
    assert any("job 'b' stopped at step 2" in record.getMessage() for record in caplog.records)
    assert json.loads((tmp_path / "out" / "a" / "training_summary.json").read_text())["steps"] == 4
    assert not (tmp_path / "out" / "b").exists()


@pytest.mark.parametrize("jobs,extra,fragment", [
    ([{"name": "a"}, {"name": "a"}], [], "line 3: the job name 'a' is taken"),
    ([{"name": "../escape"}], [], "'name' must be a directory name"),
    pytest.param([{"name": ".hidden"}], [], "'name' must be a directory name", marks=pytest.mark.slow),
    ([{"name": "a", "data_path": "missing.txt"}], [], "job 'a': --data_path missing.txt: no such file"),
    ([{"name": "a", "target_modules": ["q_proj"]}], [], "job 'a' may not set target_modules: all jobs of a run share"),
    pytest.param([{"name": "a", "per_device_train_batch_size": 2}], [], "may not set per_device_train_batch_size",
                 marks=pytest.mark.slow),
    ([{"name": "a", "r": "eight"}], [], "job 'a': r \"eight\" is not a valid value"),
    pytest.param([{"name": "a", "assistant_only_loss": 1}], [], "assistant_only_loss must be true or false",
                 marks=pytest.mark.slow),
    ([{"name": "a", "r": 0}], [], "job 'a': --r must be at least 1"),
    pytest.param([{"name": "a", "r": 80}], [], "job 'a': --r 80 exceeds the size of", marks=pytest.mark.slow),
    ([{"name": "a"}], ["--target_modules", "nonexistent"], "--target_modules nonexistent match no linear layer"),
    pytest.param([{"name": "a", "max_steps": 0}], [], "job 'a': --max_steps must be at least 1",
                 marks=pytest.mark.slow),
    ("not json", [], "line 1: not JSON"),
    pytest.param("\n", [], "holds no job", marks=pytest.mark.slow),
    ([{"name": "a"}], ["--packing"], "--packing with --jobs"),
    pytest.param([{"name": "a"}], ["--psoft_svd", "lowrank"], "--jobs needs --psoft_svd full", marks=pytest.mark.slow),
    pytest.param([{"name": "a"}], ["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint with --jobs",
                 marks=pytest.mark.slow),
])
def test_bad_jobs_are_refused_before_anything_is_written(jobs, extra, fragment, tiny_base, datasets, tmp_path):
    """One line, exit 1, and no output for any job (a good job comes first in each list)."""
    good = {"name": "good", "data_path": str(datasets[0])}
    if isinstance(jobs, str):
        (tmp_path / "jobs.jsonl").write_text(jobs + "\n")
    else:
        write_jobs(tmp_path / "jobs.jsonl", [good] + [{"data_path": str(datasets[1])} | job for job in jobs])
    result = run(*common(tiny_base("llama"), "--max_steps", 2), "--jobs", tmp_path / "jobs.jsonl", "--output_dir",
                 tmp_path / "out", *extra)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and fragment in lines[-1] and "Traceback" not in result.output, lines
    assert not (tmp_path / "out").exists(), "nothing may be written when a job is refused"


@pytest.mark.parametrize("data", [[], ["--data_path", "x.txt"]])
def test_data_comes_from_data_path_or_jobs_not_both(data, tiny_base, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"name": "a", "data_path": "x.txt"}])
    with_jobs = ["--jobs", jobs] if data else []
    result = run(*common(tiny_base("llama")), *data, *with_jobs, "--output_dir", tmp_path / "out")
    assert result.exit_code == 2 and "one of --data_path and --jobs is required" in result.output, result.output


def test_a_job_whose_output_holds_an_adapter_is_refused_without_overwrite(tiny_base, datasets, tmp_path):
    base = tiny_base("llama")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"name": "a", "data_path": str(datasets[0])},
                                                {"name": "b", "data_path": str(datasets[1])}])
    first = run(*common(base, "--max_steps", 1, "--data_path", datasets[1]), "--output_dir", tmp_path / "out" / "b")
    assert first.exit_code == 0, first.output
    refused = run(*common(base, "--max_steps", 1), "--jobs", jobs, "--output_dir", tmp_path / "out")
    assert refused.exit_code == 1 and "job 'b': " in refused.output and "already holds an adapter" in refused.output
    assert not (tmp_path / "out" / "a").exists()


def test_the_internals_check_passes_here_and_reports_a_changed_signature_in_one_line(tiny_base, datasets, tmp_path,
                                                                                      monkeypatch):
    from transformers import Trainer

    assert train_jobs.check_internals() is None  # the installed transformers and TRL are what --jobs was checked on

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, trial):  # one less
        pass

    monkeypatch.setattr(Trainer, "_init_training_state", _init_training_state)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"name": "a", "data_path": str(datasets[0])}) + "\n")
    result = run("train", "--base_model_name_or_path", tiny_base("llama"), "--output_dir", tmp_path / "out",
                 "--jobs", jobs, "--max_steps", 1)
    assert result.exit_code == 1 and not (tmp_path / "out").exists(), result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: train --jobs drives each job's trainer through internals that changed: transformers/TRL's "
        "Trainer._init_training_state is now (self, max_steps, num_update_steps_per_epoch, num_train_epochs, trial), "
        "psoft-deploy was checked on (self, max_steps, num_update_steps_per_epoch, num_train_epochs, "
        "resume_from_checkpoint, trial); train the jobs one by one, or install the transformers and TRL versions of "
        "docs/install.md")
