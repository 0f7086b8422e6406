"""The public recorder for any training loop (TrajectoryRecorder), the Trainer callback, registered engines:
what they record, that the tools read it, resume from a checkpoint, and their errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from flannel_repro import EngineRunConfig, Trajectory, TrajectoryRecorder, assert_identical, register_engine
from flannel_repro.analysis.bitwise import first_divergent_step
from flannel_repro.analysis.divergence import pair_divergence
from flannel_repro.bits import bits_view
from flannel_repro.errors import ArtifactError, ArtifactWarning, ConfigError, ResumeError
from flannel_repro.training.resume import checkpoint_path, resumable_path
from tests.faults.probes_checkpoints import flip_byte, tensor_span


class Boom(Exception):
    pass


@register_engine("test-stateless", steps=4, params={"lr": 0.1})
def stateless_engine(run):
    torch.manual_seed(run.model_seed)
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.SGD([w], lr=run.params["lr"])
    with run.recorder({"w": w}) as rec:
        for step in range(1, run.steps + 1):
            loss = (w * (run.data_seed + step)).square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss.item())


def loop(path, *, steps=12, seed=0, data_seed=0, fail_at=None, checkpoint_every=0, dtype=torch.float32):
    """A small classifier with dropout (global RNG) and an LR schedule, recorded; raises Boom after step `fail_at`."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(12, 3))
    model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    data = torch.Generator().manual_seed(99)
    x, y = torch.randn(64, 6, generator=data).to(dtype), torch.randint(0, 3, (64,), generator=data)
    order = torch.Generator().manual_seed(data_seed)  # a stateful data generator, handed to the checkpoint
    cfg = EngineRunConfig(engine="custom", steps=steps, model_seed=seed, data_seed=data_seed, dtype=str(dtype)[6:])
    with TrajectoryRecorder(
        path,
        {"w0": model[0].weight, "b3": model[3].bias},
        steps=steps,
        config=cfg,
        optimizer=opt,
        batch_size=16,
        checkpoint_every=checkpoint_every,
        state={"model": model, "optimizer": opt, "scheduler": sched, "order": order},
    ) as rec:
        for step in range(rec.start + 1, steps + 1):
            idx = torch.randperm(64, generator=order)[:16]
            loss = torch.nn.functional.cross_entropy(model(x[idx]).float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            rec.step(loss=loss.item(), batch=idx)
            if step == fail_at:
                raise Boom(step)
    return rec


def test_recorded_run_is_read_by_the_tools(tmp_path):
    loop(tmp_path / "a.safetensors")
    loop(tmp_path / "b.safetensors", seed=1)
    a, b = Trajectory(tmp_path / "a.safetensors"), Trajectory(tmp_path / "b.safetensors")
    assert a.verify() == [] and a.steps == 12 and tuple(a.W_at(0).shape) == (12, 6)
    assert tuple(a.optional("tensor.b3").shape) == (13, 3)
    assert tuple(a.batch_starts.shape) == (12, 16) and a.live_mask.all()
    assert math.isnan(a.losses[0]) and bool((a.losses[1:] > 0).all())
    ups = a.updates
    assert bool((ups["changed"][1:] > 0.5).all()) and bool((ups["lost"][1:] == 0).all())  # float32: nothing lost
    assert a.summary().tree["config"]["engine"] == "custom"
    assert first_divergent_step(a.path, b.path) == 0  # another seed: another initialisation
    d = pair_divergence(a.path, b.path)
    assert d.frobenius[-1] > 0
    loop(tmp_path / "a2.safetensors")
    assert_identical(a, Trajectory(tmp_path / "a2.safetensors"))


def test_bf16_primary_records_lost_updates(tmp_path):
    loop(tmp_path / "bf.safetensors", dtype=torch.bfloat16, steps=6)
    ups = Trajectory(tmp_path / "bf.safetensors").updates
    assert bool((ups["lost"][1:] >= 0).all()) and not math.isnan(float(ups["lost"][1]))


@pytest.mark.parametrize("fail_at", [1, 5, 12])
def test_crash_after_a_checkpoint_then_resume_equals_uninterrupted(tmp_path, fail_at):
    """A loop that dies after step k resumes from its last checkpoint (every 2 steps) and ends bitwise equal:
    the RNG (dropout), the scheduler and the data generator are restored."""
    loop(tmp_path / "ref.safetensors")
    path = tmp_path / "run.safetensors"
    with pytest.raises(Boom):
        loop(path, fail_at=fail_at, checkpoint_every=2)
    assert not path.exists()
    saved = min((fail_at // 2) * 2, 10)  # every 2 steps, never at the last step (the artifact is published then)
    assert resumable_path(path).exists() == (saved > 0) and checkpoint_path(path).exists() == (saved > 0)
    rec = loop(path, checkpoint_every=2)
    assert rec.resumed_from == (saved or None)
    assert not checkpoint_path(path).exists() and not resumable_path(path).exists()
    ref, got = Trajectory(tmp_path / "ref.safetensors"), Trajectory(path)
    for key in ref.reader.keys():
        a, b = ref.reader.read(key), got.reader.read(key)
        if a.dtype.is_floating_point:
            a, b = bits_view(a), bits_view(b)
        assert torch.equal(a, b), key


def test_recorder_errors_name_the_thing(tmp_path):
    w = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="'tensors' must map names to tensors"):
        TrajectoryRecorder(tmp_path / "r.safetensors", [w], steps=3)
    with pytest.raises(ConfigError, match=r"'steps' must be an integer >= 1 \(got 0\)"):
        TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=0)
    with pytest.raises(ConfigError, match=r"primary='v' is not one of the tensors \['w'\]"):
        TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=3, primary="v")
    with pytest.raises(ConfigError, match=r"steps=3 but config.steps=4"):
        TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=3, config=EngineRunConfig(engine="x", steps=4))
    with pytest.raises(ConfigError, match="checkpoints need the training state"):
        TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=3, checkpoint_every=1)
    with pytest.raises(ConfigError, match="'params' must hold JSON values"):
        TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=3, config={"f": object()})
    # leaving early publishes nothing and says how many steps were recorded
    with pytest.raises(ArtifactError, match=r"recorded 1 of 3 steps; nothing was published"):
        with TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=3) as rec:
            rec.step(loss=1.0)
    with pytest.raises(ArtifactError, match=r"step 1: expected batch= of 4 example indices, got 2"):
        with TrajectoryRecorder(tmp_path / "r.safetensors", {"w": w}, steps=3, batch_size=4) as rec:
            rec.step(loss=1.0, batch=[0, 1])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_engine_run_config_round_trip_and_errors():
    cfg = EngineRunConfig(engine="e", steps=5, params={"lr": 0.1, "layers": [1, 2]})
    assert EngineRunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.2).params["lr"] == 0.2 and cfg.replace(lr=0.2).fingerprint() != cfg.fingerprint()
    assert cfg.with_train_seed(3).train_seed == 3
    with pytest.raises(ConfigError, match=r"'steps' must be an integer >= 1 \(got 0\)"):
        EngineRunConfig(engine="e", steps=0)
    with pytest.raises(ConfigError, match=r"'numerics' must be 'native' or 'portable' or 'avx512bf16' \(got 'fast'\)"):
        EngineRunConfig(engine="e", steps=1, numerics="fast")


def test_register_engine_errors():
    from flannel_repro import register_engine
    from flannel_repro.training.engines import get_engine

    with pytest.raises(ConfigError, match=r"expected a new engine name, got 'torch'"):
        register_engine("torch", steps=3)
    with pytest.raises(ConfigError, match=r"engine 'nope' is not registered"):
        get_engine("nope")

    def make():
        @register_engine("local-engine", steps=3)
        def train(run):
            pass

    with pytest.raises(ConfigError, match="must be defined at a module's top level"):
        make()


def test_trainer_callback_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from flannel_repro import FlannelCallback

    with pytest.raises(ConfigError, match="'tensors' must be a list of parameter names"):
        FlannelCallback(tmp_path / "t.safetensors", "transformer.wte.weight")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    ids = torch.randint(0, 50, (16, 8))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    cb = FlannelCallback(tmp_path / "t.safetensors", ["transformer.no_such.weight"])
    with pytest.raises(ConfigError, match=r"no parameter \['transformer.no_such.weight'\] in the model"):
        Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert not (tmp_path / "t.safetensors").exists()


def test_report_on_recorded_runs_of_your_own_model(tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (the 'report' extra)")
    import json

    from flannel_repro.report import write_report

    runs = tmp_path / "runs"
    runs.mkdir()
    loop(runs / "s0.safetensors")
    loop(runs / "s1.safetensors", seed=1, data_seed=1)
    loop(runs / "d1.safetensors", data_seed=1)
    result = write_report([runs], tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(doc["runs"]) == 3 and result.page.exists()
    assert "data order only (model_seed fixed)" in json.dumps(doc)
    assert (tmp_path / "report" / "loss.png").stat().st_size > 0


def test_an_engine_without_state_trains_where_checkpoints_are_on_and_refuses_resume_at(tmp_path):
    from flannel_repro.training.engines import get_engine
    from flannel_repro.runs.store import RunStore

    store = RunStore(tmp_path, checkpoint_every=2)  # the session's default is on (100)
    cfg = get_engine("test-stateless").config(model_seed=1, data_seed=1)
    got = store.obtain(cfg)
    assert got.trained and got.trajectory.steps == 4 and got.trajectory.verify() == []
    assert store.obtain(cfg).trained is False  # shared: the same key is read back, not trained again
    with pytest.raises(RuntimeError, match="resume_at needs the training state to checkpoint"):
        store.obtain(cfg, resume_at=2)


@pytest.mark.parametrize("damage", ["checkpoint tensor", "partial row"])
def test_a_damaged_checkpoint_of_your_own_loop_is_discarded_and_it_starts_at_step_0(tmp_path, damage):
    """A checkpoint or partial file changed on disk is never resumed: `rec.start` is 0, the artifact says why,
    and the run equals the uninterrupted one."""
    loop(tmp_path / "ref.safetensors")
    path = tmp_path / "run.safetensors"
    with pytest.raises(Boom):
        loop(path, fail_at=6, checkpoint_every=3)
    target, name = (
        (checkpoint_path(path), "objects.optimizer.state.0.exp_avg")
        if damage == "checkpoint tensor"
        else (resumable_path(path), "W")
    )
    begin, end = tensor_span(target, name)
    flip_byte(target, begin + (end - begin) // 3)
    with pytest.warns(ArtifactWarning, match="not resumed, trained from the start"):
        rec = loop(path, checkpoint_every=3)
    assert rec.start == 0 and rec.resumed_from is None and rec.resume_discarded
    assert Trajectory(path).metadata["resume_discarded"] == rec.resume_discarded
    assert_identical(Trajectory(tmp_path / "ref.safetensors"), Trajectory(path))


def test_your_own_loop_that_resumes_into_other_steps_is_stopped_with_a_named_error(tmp_path):
    """The steps a stopped loop recorded after its checkpoint must come out again when it resumes; a step
    that does not is a ResumeError naming the step, and the checkpoint is discarded for the next attempt."""
    path = tmp_path / "run.safetensors"
    with pytest.raises(Boom):
        loop(path, fail_at=5, checkpoint_every=3)
    begin, end = tensor_span(resumable_path(path), "digests")
    with open(resumable_path(path), "r+b") as f:  # step 5's digest, recorded after the checkpoint of step 3
        f.seek(begin + 5 * 32)
        f.write(b"\x01" * 32)
    with pytest.raises(ResumeError, match=r"resumed from step 3, step 5 has digest .* the stopped run recorded 0101"):
        loop(path, checkpoint_every=3)
    assert not checkpoint_path(path).exists() and not resumable_path(path).exists() and not path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loop(path, checkpoint_every=3).start == 0
