"""Tests for a3c.py, in the order of the design card: n-step returns, loss signs, gradient transfer through shared
memory, learning (single-worker convergence first, then the other slow learning tests); then the rest: rollouts
and the batch loss, GAE, running statistics, the Gaussian policy, the data path, recurrent state, whole runs,
pixels, diagnostics, and operating it (bad input, checkpoints, signals, crashes)."""
import contextlib
import copy
import csv
import errno
import math
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import types

import gymnasium as gym
import imageio_ffmpeg
from gymnasium.envs.classic_control import CartPoleEnv
import numpy as np
import pytest
import torch

import a3c

HERE = os.path.dirname(os.path.abspath(__file__))
A3C = os.path.join(HERE, "a3c.py")
SPAWN = multiprocessing.get_context("spawn")
FRAME_STACK = 4  # make_env's default, and --frame-stack's


# --- n-step returns -----------------------------------------------------------------------------------

def test_returns_terminated_bootstrap_zero():
    returns = a3c.n_step_returns([1.0, 1.0, 1.0], 0.0, gamma=0.5)
    assert returns.dtype == torch.float32 and returns.shape == (3,)
    torch.testing.assert_close(returns, torch.tensor([1.75, 1.5, 1.0]))


def test_returns_truncated_bootstrap_from_value():
    torch.testing.assert_close(a3c.n_step_returns([1.0, 1.0, 1.0], 4.0, gamma=0.5), torch.tensor([2.25, 2.5, 3.0]))


def test_returns_gamma_edge_cases():
    # gamma = 1: plain sums of the remaining rewards plus the bootstrap value
    torch.testing.assert_close(a3c.n_step_returns([1.0, 2.0, 3.0], 10.0, gamma=1.0), torch.tensor([16.0, 15.0, 13.0]))
    # gamma -> 0: each return is its own reward, the bootstrap value no longer matters
    torch.testing.assert_close(a3c.n_step_returns([1.0, 2.0], 100.0, gamma=1e-9), torch.tensor([1.0, 2.0]))
    # one step: r_0 + gamma * bootstrap; numpy rewards and tensor bootstrap are accepted too
    torch.testing.assert_close(a3c.n_step_returns(np.array([2.0], np.float32), torch.tensor(3.0), 0.9),
                               torch.tensor([4.7]))


def test_returns_do_not_change_inputs():
    rewards = np.array([1.0, 2.0], np.float32)
    a3c.n_step_returns(rewards, 1.0, 0.9)
    np.testing.assert_array_equal(rewards, [1.0, 2.0])


# --- loss signs ---------------------------------------------------------------------------------------

def discrete_loss(logits, values, actions, returns, value_coef, entropy_coef):
    log_probs, entropy = a3c.CategoricalHead(1, logits.shape[1]).log_prob_entropy(logits, actions)
    return a3c.a3c_loss(log_probs, entropy, values, returns, value_coef, entropy_coef)[0]


def one_sgd_step(logits, values, actions, returns, value_coef=0.5, entropy_coef=0.0, lr=0.1):
    logits = logits.clone().requires_grad_()
    values = values.clone().requires_grad_()
    discrete_loss(logits, values, actions, returns, value_coef, entropy_coef).backward()
    with torch.no_grad():
        return logits - lr * logits.grad, values - lr * values.grad, logits.grad, values.grad


def test_positive_advantage_raises_chosen_action_probability():
    logits, values, actions = torch.zeros(1, 3), torch.zeros(1), torch.tensor([1])
    new_logits, *_ = one_sgd_step(logits, values, actions, returns=torch.tensor([2.0]))
    assert torch.softmax(new_logits, -1)[0, 1] > 1 / 3
    new_logits, *_ = one_sgd_step(logits, values, actions, returns=torch.tensor([-2.0]))
    assert torch.softmax(new_logits, -1)[0, 1] < 1 / 3


def test_value_loss_pulls_value_toward_return():
    logits, actions = torch.zeros(2, 2), torch.tensor([0, 1])
    values, returns = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])
    _, new_values, _, _ = one_sgd_step(logits, values, actions, returns)
    assert new_values[0] > 1.0 and new_values[1] < 5.0
    assert (new_values - returns).abs().max() < (values - returns).abs().max()


def test_value_loss_zero_when_values_equal_returns():
    returns = torch.tensor([1.0, -2.0])
    loss = discrete_loss(torch.zeros(2, 2), returns.clone(), torch.tensor([0, 1]), returns, value_coef=1.0, entropy_coef=0.0)
    assert loss.item() == 0.0


def test_policy_term_does_not_train_the_critic():
    """The advantage is detached: with value_coef = 0 no gradient reaches the values."""
    _, _, _, values_grad = one_sgd_step(torch.randn(4, 2), torch.randn(4), torch.tensor([0, 1, 1, 0]),
                                        torch.randn(4), value_coef=0.0)
    assert values_grad is None or torch.count_nonzero(values_grad) == 0


def test_entropy_bonus_pushes_peaked_policy_toward_uniform():
    def entropy(logits):
        p = torch.softmax(logits, -1)
        return -(p * p.log()).sum().item()
    logits, values = torch.tensor([[3.0, 0.0, -1.0]]), torch.zeros(1)
    # zero advantage, no value loss: only the entropy term moves the logits
    new_logits, *_ = one_sgd_step(logits, values, torch.tensor([0]), torch.zeros(1), value_coef=0.0, entropy_coef=1.0)
    assert entropy(new_logits) > entropy(logits)


def test_loss_terms_are_reported_as_floats():
    log_probs, entropy = a3c.CategoricalHead(1, 2).log_prob_entropy(torch.zeros(2, 2), torch.tensor([0, 1]))
    loss, stats = a3c.a3c_loss(log_probs, entropy, torch.zeros(2), torch.tensor([1.0, 3.0]), 0.5, 0.01)
    assert set(stats) == {"policy_loss", "value_loss", "entropy"}
    assert all(type(value) is float for value in stats.values())
    # zero logits: log pi = -log 2, A = R - V = [1, 3]; value loss mean((R - V)^2) / 2 = 2.5; entropy log 2
    assert stats["policy_loss"] == pytest.approx(2 * math.log(2))
    assert stats["value_loss"] == pytest.approx(2.5) and stats["entropy"] == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(2 * math.log(2) + 0.5 * 2.5 - 0.01 * math.log(2))


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(AssertionError):
        a3c.a3c_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3), 0.5, 0.01)
    with pytest.raises(AssertionError):  # a Gaussian's log-probabilities must be summed over dimensions first
        a3c.a3c_loss(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.5, 0.01)


# --- gradient transfer through shared memory: SharedAdam, Hogwild updates, a spawned child ------------

# Every Hogwild test runs on each head and on the recurrent core: the Gaussian's log_std and the LSTM cell's
# weights are parameters like any other, shared and updated in place with the rest.
MODELS = pytest.mark.parametrize("kind", ["categorical", "gaussian", "lstm"])


def small_model(kind):
    torch.manual_seed(0)
    return a3c.ActorCritic(4, 2, hidden=16, continuous=kind == "gaussian", lstm=kind == "lstm")


def adam_pair(kind="categorical", **kwargs):
    model = small_model(kind)
    twin = copy.deepcopy(model)
    return model, a3c.SharedAdam(model.parameters(), **kwargs), twin, torch.optim.Adam(twin.parameters(), **kwargs)


@MODELS
@pytest.mark.parametrize("kwargs", [{}, {"lr": 3e-3, "weight_decay": 0.1, "amsgrad": True}, {"fused": True}])
def test_shared_adam_equals_torch_adam(kwargs, kind):
    model, shared_adam, twin, adam = adam_pair(kind, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        shared_adam.step()
        adam.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key, value in adam.state[q].items():
            torch.testing.assert_close(shared_adam.state[p][key], value, rtol=0, atol=0)
    assert shared_adam.state[next(model.parameters())]["step"].item() == 10


@MODELS
def test_shared_adam_state_is_in_shared_memory_from_the_start(kind):
    model, shared_adam, _, _ = adam_pair(kind)
    assert shared_adam.share_memory() is shared_adam
    # log_std for the Gaussian; the LSTM's W, b and U
    assert len(shared_adam.state) == len(list(model.parameters())) == {"categorical": 8, "gaussian": 9, "lstm": 11}[kind]
    for p in model.parameters():
        state = shared_adam.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(tensor.is_shared() for tensor in state.values())
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0


def test_shared_adam_stays_shared_after_loading_state():
    model, shared_adam, _, _ = adam_pair()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    shared_adam.step()
    state = shared_adam.state_dict()
    model2, shared_adam2, _, _ = adam_pair()
    shared_adam2.load_state_dict(state)
    for p in model2.parameters():
        assert shared_adam2.state[p]["step"].item() == 1
        assert all(tensor.is_shared() for tensor in shared_adam2.state[p].values())


def child_steps(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("steps_before", [0, 3])
def test_shared_adam_loads_an_empty_or_a_full_state_and_still_shares_it(steps_before):
    """A plain Adam saved before its first step (data mode's learner stopped early) has no state at all; loaded,
    every parameter still gets a step and moments in shared memory, so that a forked worker's update is the parent's,
    and the next state_dict is whole again."""
    model = small_model("categorical")
    adam = torch.optim.Adam(model.parameters())
    for _ in range(steps_before):
        child_steps(adam)
    state = adam.state_dict()
    assert len(state["state"]) == (0 if steps_before == 0 else len(list(model.parameters())))
    shared_model = small_model("categorical")
    shared_model.share_memory()
    shared_adam = a3c.SharedAdam(shared_model.parameters())
    shared_adam.load_state_dict(state)
    for p in shared_model.parameters():
        assert set(shared_adam.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(tensor.is_shared() for tensor in shared_adam.state[p].values())
        assert shared_adam.state[p]["step"].item() == steps_before
    child = multiprocessing.get_context("fork").Process(target=child_steps, args=(shared_adam,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    for p in shared_model.parameters():
        state = shared_adam.state[p]
        assert state["step"].item() == steps_before + 1 and state["exp_avg"].abs().sum() > 0
    assert len(shared_adam.state_dict()["state"]) == len(list(shared_model.parameters()))


@pytest.mark.parametrize("schedule, max_steps, expected", [
    ("constant", 1000, [0.01, 0.01, 0.01, 0.01]), ("linear", 1000, [0.01, 0.0075, 0.0, 0.0]),
    ("linear", None, [0.01, 0.01, 0.01, 0.01])])  # no budget to decay over: constant
def test_learning_rate_schedule_at_step_k(schedule, max_steps, expected):
    args = types.SimpleNamespace(lr=0.01, lr_schedule=schedule, max_steps=max_steps)
    optimizer = torch.optim.Adam(a3c.ActorCritic(4, 2, 16).parameters())
    rates = [a3c.set_learning_rate(optimizer, args, k) for k in (0, 250, 1000, 1500)]
    assert rates == pytest.approx(expected) and optimizer.param_groups[0]["lr"] == rates[-1]


def test_hogwild_workers_take_their_rate_from_the_runs_step_count():
    args = a3c.parse_args(["--workers", "1", "--hidden", "16", "--n-steps", "5", "--envs-per-worker", "2",
                           "--lr-schedule", "linear", "--max-steps", "10000"])
    a3c.prepare(args)
    shared_model = a3c.ActorCritic(4, 2, 16)
    shared_model.share_memory()
    optimizer = a3c.SharedAdam(shared_model.parameters(), lr=args.lr)
    steps = a3c.StepCounter(multiprocessing.get_context("fork"), 1, start=4000)  # resumed at step 4000
    seeds = a3c.run_seeds(0, 0, 1, args.envs_per_worker)[0]
    worker = a3c.gradient_worker(0, args, seeds, shared_model, optimizer, steps)
    for k in range(3):
        taken, (_, _, update) = next(worker)
        expected = args.lr * (1 - (4000 + 10 * k) / 10000)
        assert update["learning_rate"] == pytest.approx(expected) == optimizer.param_groups[0]["lr"]
        steps.add(0, taken)  # as worker_process does


def fixed_rollout(kind="categorical"):
    """A batch of one rollout: five steps of one env in a RolloutBuffer, cut by n_steps; for the LSTM, from a core
    state that is not zero (the rollout continues an episode)."""
    rng = np.random.default_rng(0)
    buffer = a3c.RolloutBuffer.allocate(small_model(kind), 5, 1)
    obs = rng.standard_normal((5, 4)).astype(np.float32)
    buffer.obs[:, 0] = torch.from_numpy(obs)
    buffer.actions[:, 0] = (torch.from_numpy(rng.standard_normal((5, 2)).astype(np.float32)) if kind == "gaussian"
                            else torch.tensor([0, 1, 1, 0, 1]))
    buffer.rewards[:] = 1.0
    buffer.final_obs[4, 0] = torch.from_numpy(obs[-1] + 0.1)
    buffer.core_state[0, 0] = torch.from_numpy(rng.standard_normal(buffer.core_state.shape[-1]).astype(np.float32))
    return [(buffer, [a3c.Rollout(0, 0, 5, False, None)])]


def rollout_gradient(model, batch):
    model = copy.deepcopy(model)
    model.zero_grad()
    a3c.rollout_loss(model, batch, 0.99, 0.5, 0.01)[0].backward()
    return [p.grad.clone() for p in model.parameters()]


@MODELS
def test_each_hogwild_update_applies_only_its_own_gradient(kind):
    """The torch >= 2.0 port bug made the local gradients sum across updates (g, 2g, 3g, ...)."""
    shared_model = small_model(kind)
    local_model = copy.deepcopy(shared_model)
    optimizer = torch.optim.SGD(shared_model.parameters(), lr=0.0)  # lr 0: the same loss every time
    batch = fixed_rollout(kind)
    expected = rollout_gradient(local_model, batch)
    for _ in range(3):
        loss, _ = a3c.rollout_loss(local_model, batch, 0.99, 0.5, 0.01)
        grad_norm = a3c.hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm=float("inf"))
        assert type(grad_norm) is float
        assert grad_norm == pytest.approx(torch.linalg.vector_norm(torch.cat([g.flatten() for g in expected])).item())
        for p, g in zip(shared_model.parameters(), expected):
            torch.testing.assert_close(p.grad, g)


def child_applies_gradient(shared_model, optimizer, batch):
    torch.set_num_threads(1)
    local_model = copy.deepcopy(shared_model)
    local_model.load_state_dict(shared_model.state_dict())
    loss, _ = a3c.rollout_loss(local_model, batch, 0.99, 0.5, 0.01)
    a3c.hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm=float("inf"))


@MODELS
def test_gradient_from_spawned_child_updates_shared_model_as_adam_would(kind):
    shared_model = small_model(kind)
    shared_model.share_memory()
    optimizer = a3c.SharedAdam(shared_model.parameters(), lr=1e-2)
    reference = copy.deepcopy(shared_model)
    reference_adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    batch = fixed_rollout(kind)
    for p, g in zip(reference.parameters(), rollout_gradient(reference, batch)):
        p.grad = g
    reference_adam.step()

    for step in (1, 2):
        child = SPAWN.Process(target=child_applies_gradient, args=(shared_model, optimizer, batch))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0
        for p in shared_model.parameters():
            assert optimizer.state[p]["step"].item() == step  # the child's step counter is the parent's
        if step == 1:
            for p, q in zip(shared_model.parameters(), reference.parameters()):
                torch.testing.assert_close(p, q)
            if kind == "gaussian":  # the child moved the parent's sigma, exactly as Adam would
                assert torch.count_nonzero(shared_model.policy.log_std) == 2
            first = [p.detach().clone() for p in shared_model.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(shared_model.parameters(), first))


# --- learning: single-worker convergence, then the other slow learning tests --------------------------

def run_cli(*flags, timeout):
    proc = subprocess.run([sys.executable, A3C, *flags], capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"result: solved=(yes|no) episodes=(\d+) steps=(\d+) seconds=([\d.]+) "
                         r"steps_per_second=(\d+) mean_return=(nan|[-\d.]+)", last)
    assert match, last
    return match


@pytest.mark.parametrize("mode", ["gradient", "data"])
def test_single_worker_learns_cartpole(mode, tmp_path):
    """One worker solves CartPole-v1: mean return of the last 100 episodes >= 475 (its reward_threshold).

    Reliable by construction: the budget is in env steps, not seconds, so a busy machine makes the test
    slower but not flaky. One worker in gradient mode is deterministic for a seed; data mode is not (the
    learner and the worker race), so its budget has the wide margin: on this 2-core machine seeds 1-5
    solved in 67k-82k steps (gradient) and 67k-75k (data), seeds drawn by run_seeds. Data mode can still
    fall into a collapse and climb out of it (seen once in this suite's history at over 300k steps, against
    70k-101k in five repeats of seed 1), so the budget is 800k, about 35 s at data mode's speed. The timeout
    only guards against a hang.
    """
    match = run_cli("--workers", "1", "--mode", mode, "--seed", "1", "--max-steps", "800000",
                    "--save", str(tmp_path / "model.pth"), timeout=150)
    assert match.group(1) == "yes", match.group(0)
    assert float(match.group(6)) >= 475


def test_single_worker_learns_a_continuous_task(tmp_path, capsys):
    """One gradient worker solves InvertedPendulum-v5 (mean return of the last 100 episodes >= 950, its
    reward_threshold) with the Gaussian head: deterministic for a seed, measured at 138k steps for seed 1 on
    this 2-core machine; the budget is 600k steps and the timeout only guards against a hang."""
    match = run_cli("--env", "InvertedPendulum-v5", "--workers", "1", "--entropy-coef", "0", "--seed", "1",
                    "--max-steps", "600000", "--save", str(tmp_path / "model.pth"), timeout=240)
    assert match.group(1) == "yes", match.group(0)
    assert float(match.group(6)) >= 950
    checkpoint = a3c.load_checkpoint(str(tmp_path / "model.pth"))
    assert checkpoint["continuous"] and checkpoint["n_actions"] == 1 and "policy.log_std" in checkpoint["model"]
    # --eval plays the Gaussian's mean: a policy that balances with noise balances without it
    capsys.readouterr()
    assert a3c.main(["--eval", str(tmp_path / "model.pth"), "--episodes", "2"]) == 0
    assert "result: solved=yes" in capsys.readouterr().out


class SideImageEnv(gym.Env):
    """84x84 grayscale frames with a bright bar on the left or right half; action 0 is right for "left", 1
    for "right" (+1, else -1). 20 steps an episode, which then truncates. With fill_step, frame t is filled
    with 10 * t instead, and reset shows 255, so each frame names its step."""
    observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)
    action_space = gym.spaces.Discrete(2)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode=None, fill_step=False):
        self.render_mode, self.fill_step, self.t, self.side = render_mode, fill_step, 0, 0

    def render(self):
        return np.repeat(self.frame()[:, :, None], 3, axis=2)  # [84, 84, 3]: what a person would see

    def frame(self):
        if self.fill_step:
            return np.full((84, 84), 255 if self.t == 0 else 10 * self.t, np.uint8)
        pixels = np.zeros((84, 84), np.uint8)
        pixels[20:64, 4:38] = 200 if self.side == 0 else 0
        pixels[20:64, 46:80] = 200 if self.side == 1 else 0
        return pixels

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.side = 0, int(self.np_random.integers(2))
        return self.frame(), {}

    def step(self, action):
        reward = 1.0 if action == self.side else -1.0
        self.t, self.side = self.t + 1, int(self.np_random.integers(2))
        return self.frame(), reward, False, self.t >= 20, {}


gym.register("SideImage-v0", entry_point=SideImageEnv, disable_env_checker=True, reward_threshold=16.0)
gym.register("StepImage-v0", entry_point=SideImageEnv, disable_env_checker=True, kwargs={"fill_step": True})


def test_single_worker_learns_an_image_task(tmp_path, capsys):
    """The rewarded action depends on what the pixels show; a random policy scores 0 on average. One gradient
    worker (deterministic for a seed) reaches the mean of 16 out of 20 within a small step budget."""
    assert a3c.main(["--env", "SideImage-v0", "--workers", "1", "--seed", "1", "--hidden", "32",
                     "--max-steps", "60000", "--save", str(tmp_path / "model.pth")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("result: solved=yes"), last
    # the conv policy plays greedily, and each episode becomes a video: the reset frame and one per step
    videos = tmp_path / "videos"
    assert a3c.main(["--eval", str(tmp_path / "model.pth"), "--episodes", "2", "--video", str(videos)]) == 0
    assert "result: solved=yes" in capsys.readouterr().out
    assert sorted(os.listdir(videos)) == ["eval-episode-0.mp4", "eval-episode-1.mp4"]
    for video in videos.iterdir():
        assert imageio_ffmpeg.count_frames_and_secs(str(video))[0] == 21
    # a conv checkpoint resumes: counters, weights and optimizer state carry on, and it still plays well
    trained = a3c.load_checkpoint(str(tmp_path / "model.pth"))
    assert a3c.main(["--resume", str(tmp_path / "model.pth"), "--max-steps", str(trained["steps"] + 2000),
                     "--target-return", "1e9", "--workers", "1", "--save", str(tmp_path / "model.pth")]) == 0
    resumed = a3c.load_checkpoint(str(tmp_path / "model.pth"))
    assert resumed["steps"] >= trained["steps"] + 2000 and resumed["episodes"] > trained["episodes"]
    assert resumed["optimizer"]["state"][0]["step"] > trained["optimizer"]["state"][0]["step"]


class CueEnv(gym.Env):
    """A memory task: the first observation shows a cue (+1 or -1), the next ones show nothing; at the
    fourth step (observation [0, 1]) the action that matches the cue earns +1, the other -1, and the
    episode ends. A feed-forward policy sees the same [0, 1] whatever the cue, so it can expect 0 at best."""
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)
    delay = 3

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        return np.array([2.0 * self.cue - 1, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t <= self.delay:
            return np.array([0.0, float(self.t == self.delay)], np.float32), 0.0, False, False, {}
        return np.zeros(2, np.float32), 1.0 if action == self.cue else -1.0, True, False, {}


gym.register("Cue-v0", entry_point=CueEnv, disable_env_checker=True, reward_threshold=0.9)


@pytest.mark.parametrize("lstm", [True, False], ids=["lstm", "feed-forward"])
def test_a_memory_task_is_learned_with_an_lstm_and_not_without(lstm, tmp_path, capsys):
    """One deterministic worker (gradient mode, one seed), the same step budget: the LSTM agent reaches a
    mean of 0.9 over 100 episodes (seed 1: after 2,944 steps); the feed-forward agent stays near 0, the most it
    can expect. The LSTM checkpoint then plays every cue right in --eval, which carries the state through each
    episode, and resumes in data mode without being told it has an LSTM."""
    path = str(tmp_path / "cue.pth")
    flags = ["--env", "Cue-v0", "--workers", "1", "--seed", "1", "--n-steps", "4", "--hidden", "32",
             "--max-steps", "20000", "--save", path]
    args = a3c.parse_args([*flags, *(["--lstm"] if lstm else [])])
    a3c.prepare(args)
    summary = a3c.train(args)
    assert summary["exit_code"] == 0
    if not lstm:
        assert summary["steps"] >= 20000 and summary["mean_return"] < 0.5, summary
        return
    assert summary["solved"] and summary["mean_return"] >= 0.9, summary
    assert a3c.load_checkpoint(path)["lstm"]
    capsys.readouterr()
    assert a3c.main(["--eval", path, "--episodes", "20"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("mean_return=1.0")
    assert a3c.main(["--resume", path, "--mode", "data", "--workers", "1", "--target-return", "1e9",
                     "--max-steps", str(summary["steps"] + 2000), "--save", path]) == 0
    assert a3c.load_checkpoint(path)["steps"] >= summary["steps"] + 2000


# --- rollouts, the bootstrap rule and the batch loss --------------------------------------------------

class CountingEnv(gym.Env):
    """Observation [steps so far, 0]; reset gives [-1, 0], so a bootstrap from the reset obs shows up."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, end_at=3, truncate=False):
        self.end_at, self.truncate, self.t = end_at, truncate, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([-1.0, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.end_at
        obs = np.array([self.t, 0.0], np.float32)
        return obs, 1.0, end and not self.truncate, end and self.truncate, {}


def steps_of(buffer, rollout):
    """What a Rollout marks out in its RolloutBuffer, as numpy views, with the Rollout's own fields: obs s_0 ..
    s_{T-1}, actions, rewards, final_obs s_T, core_state before s_0; and the Rollout itself as .rollout."""
    r = rollout
    return types.SimpleNamespace(**r._asdict(), rollout=r, obs=buffer.obs[r.start:r.stop, r.env_index].numpy(),
                                 actions=buffer.actions[r.start:r.stop, r.env_index].numpy(),
                                 rewards=buffer.rewards[r.start:r.stop, r.env_index].numpy(),
                                 final_obs=buffer.final_obs[r.stop - 1, r.env_index].numpy(),
                                 core_state=buffer.core_state[r.start, r.env_index].numpy())


def collect(envs, model, obs, n_steps):
    """What a gradient worker does each update: act n_steps in each env into a RolloutBuffer. Returns the buffer
    and, for each Rollout, what it marks out in it (steps_of)."""
    buffer = a3c.RolloutBuffer.allocate(model, n_steps, len(envs))
    core_state = model.initial_core_state(len(envs)).numpy()
    rollouts = a3c.collect_rollouts(envs, model, obs, core_state, buffer, np.random.default_rng(0))
    assert all(type(r) is a3c.Rollout for r in rollouts)
    return buffer, [steps_of(buffer, r) for r in rollouts]


def run_rollouts(envs, n_steps):
    envs = [gym.wrappers.RecordEpisodeStatistics(env) for env in envs]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    model = a3c.ActorCritic(2, 2, hidden=8)
    return collect(envs, model, obs, n_steps)[1], obs


def test_rollout_truncated_keeps_final_obs_not_reset_obs():
    (ended, cut), obs = run_rollouts([CountingEnv(end_at=3, truncate=True)], n_steps=5)
    # ended by truncation: not terminated, and an episode ended with it
    assert len(ended.rewards) == 3 and not ended.terminated and ended.episode is not None
    np.testing.assert_array_equal(ended.final_obs, [3.0, 0.0])  # s_T, to bootstrap from
    np.testing.assert_array_equal(ended.obs[:, 0], [-1.0, 1.0, 2.0])
    assert ended.episode == (3.0, 3)  # the true undiscounted return and length
    # the next piece starts from the reset observation and is cut by n_steps after 2 steps
    np.testing.assert_array_equal(cut.obs[:, 0], [-1.0, 1.0])
    assert not cut.terminated and cut.episode is None
    np.testing.assert_array_equal(cut.final_obs, [2.0, 0.0])
    np.testing.assert_array_equal(obs, [[2.0, 0.0]])  # where the next call carries on


def test_rollouts_of_several_envs_terminated_and_cut():
    rollouts, _ = run_rollouts([CountingEnv(end_at=3), CountingEnv(end_at=10)], n_steps=4)
    assert [(r.env_index, r.start, r.stop, r.terminated, r.episode) for r in rollouts] == [
        (0, 0, 3, True, (3.0, 3)),  # env 0: an episode ends at step 3 ...
        (0, 3, 4, False, None),  # ... env 0: the next one is cut after 1 more step
        (1, 0, 4, False, None),  # env 1: cut after 4 steps, no episode ended
    ]
    np.testing.assert_array_equal(rollouts[2].final_obs, [4.0, 0.0])
    for r in rollouts:
        assert r.obs.dtype == np.float32 and r.actions.dtype == np.int64 and r.rewards.dtype == np.float32
        assert r.obs.shape == (len(r.rewards), 2) and r.final_obs.shape == (2,)


def test_sample_actions_follow_the_policy():
    """Gumbel-max sampling, as collect_rollouts samples: frequencies match softmax(logits) (3-sigma bound on
    20000 samples)."""
    model = a3c.ActorCritic(2, 3, hidden=8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.policy.out.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    with torch.inference_mode():
        logits, _, _ = model(torch.zeros(20000, 2), model.initial_core_state(20000))
    actions = model.policy.sample(logits.numpy(), np.random.default_rng(0))
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).numpy()
    frequencies = np.bincount(actions, minlength=3) / len(actions)
    assert np.all(np.abs(frequencies - expected) < 3 * np.sqrt(expected * (1 - expected) / len(actions)))


def rollout_of(values, rewards, final_value, terminated=False, truncated=False):
    """A batch entry (RolloutBuffer, [Rollout]) for ValueIsFirstCoordinate: T steps of one env whose V(s_t) are
    values (s_t = [values[t], 0]), action 0 at every step, V(s_T) = final_value; an episode ends with it if it
    terminated or truncated."""
    T = len(values)
    obs, final_obs = torch.zeros(T, 1, 2), torch.zeros(T, 1, 2)
    obs[:, 0, 0] = torch.as_tensor(values, dtype=torch.float32)
    final_obs[T - 1, 0, 0] = final_value
    buffer = a3c.RolloutBuffer(obs, torch.zeros(T, 1, dtype=torch.int64),
                               torch.as_tensor(rewards, dtype=torch.float32).reshape(T, 1), final_obs,
                               torch.zeros(T, 1, 0))
    episode = (float(sum(rewards)), T) if terminated or truncated else None
    return buffer, [a3c.Rollout(0, 0, T, terminated, episode)]


def make_rollout(first_obs, T, terminated=False, truncated=False):
    """rollout_of s_t = [first_obs + t, 0] with reward 1 at every step, s_T = [first_obs + T, 0]."""
    return rollout_of([first_obs + t for t in range(T)], [1.0] * T, first_obs + T, terminated, truncated)


class ValueIsFirstCoordinate:
    """A stand-in model whose V(s) is s[0], so each bootstrap value names the observation it came from;
    its policy is uniform over 2 actions (zero logits). It keeps the observations of each call."""
    policy = a3c.CategoricalHead(1, 2)

    def __init__(self):
        self.calls = []

    def __call__(self, obs, core_state=None, lengths=None):
        self.calls.append(obs.clone())
        return torch.zeros(obs.shape[0], 2, requires_grad=True), obs[:, 0].clone().requires_grad_(), core_state

    def reward_normalization(self):
        return 1.0


value_is_first_coordinate = ValueIsFirstCoordinate()


def test_batch_bootstraps_follow_termination_rule(monkeypatch):
    terminated = make_rollout(10.0, 3, terminated=True)  # final obs [13, 0]
    truncated = make_rollout(20.0, 2, truncated=True)  # final obs [22, 0]: a time limit, or
    cut = make_rollout(30.0, 4)  # final obs [34, 0]: a cut by n_steps, bootstrap alike
    batch = [terminated, truncated, cut]
    model = ValueIsFirstCoordinate()
    _, _, final_values = a3c.learning_pass(model, [(buffer, r) for buffer, rollouts in batch for r in rollouts])
    torch.testing.assert_close(final_values, torch.tensor([13.0, 22.0, 34.0]))  # V(s_T) of each, in order
    # the returns start from R_T = 0 after the termination, V(s_T) otherwise
    bootstraps, n_step_returns = [], a3c.n_step_returns
    monkeypatch.setattr(a3c, "n_step_returns", lambda rewards, bootstrap, gamma:
                        bootstraps.append(bootstrap) or n_step_returns(rewards, bootstrap, gamma))
    model = ValueIsFirstCoordinate()
    a3c.rollout_loss(model, batch, 0.5, 0.5, 0.01)
    assert bootstraps == [0.0, 22.0, 34.0]
    # the trained rows are the states s_0 .. s_{T-1} of each rollout, in order: no bootstrap state among them;
    # the final states get a forward pass of their own
    trained, finals = model.calls
    torch.testing.assert_close(trained[:, 0], torch.tensor([10.0, 11.0, 12.0, 20.0, 21.0, 30.0, 31.0, 32.0, 33.0]))
    torch.testing.assert_close(finals[:, 0], torch.tensor([13.0, 22.0, 34.0]))


def test_rollout_loss_uses_bootstrap():
    """With zero logits and V = s[0], the loss is known in closed form: check the value part."""
    gamma = 0.5
    for rollout, bootstrap in [(make_rollout(4.0, 1, terminated=True), 0.0), (make_rollout(4.0, 1), 5.0)]:
        loss, stats = a3c.rollout_loss(value_is_first_coordinate, [rollout], gamma, value_coef=1.0, entropy_coef=0.0)
        expected_return = 1.0 + gamma * bootstrap
        # zero logits: log pi = log 0.5; policy term = -log(0.5) * (R - V)
        expected = -np.log(0.5) * (expected_return - 4.0) + 0.5 * (expected_return - 4.0) ** 2
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        # the terms reported for monitoring are the same pieces, as floats
        assert all(type(value) is float for value in stats.values())
        assert stats["policy_loss"] == pytest.approx(-np.log(0.5) * (expected_return - 4.0), rel=1e-6)
        assert stats["value_loss"] == pytest.approx(0.5 * (expected_return - 4.0) ** 2, rel=1e-6)
        assert stats["entropy"] == pytest.approx(np.log(2), rel=1e-6)
        assert math.isnan(stats["explained_variance"])  # one return: nothing to explain


def two_rollouts_of_different_lengths():
    """One RolloutBuffer of 3 steps x 2 envs, for ValueIsFirstCoordinate (V(s) = s[0]): env 0's episode terminates
    after 2 steps, env 1's rollout is cut by n_steps after 3. Everything a misread would pick up is set apart:
    env 0's third row (the start of its next episode, not in the batch) and its s_T, which a terminal state's
    return must not use."""
    buffer = a3c.RolloutBuffer(torch.zeros(3, 2, 2), torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2),
                               torch.zeros(3, 2, 2), torch.zeros(3, 2, 0))
    buffer.obs[:, 0, 0] = torch.tensor([2.0, 1.0, 50.0])  # env 0: V(s_0) = 2, V(s_1) = 1; row 2 not in the batch
    buffer.rewards[:, 0] = torch.tensor([1.0, 3.0, 40.0])
    buffer.final_obs[1, 0, 0] = 7.0  # env 0's s_T, terminal: its return starts from 0, not from 7
    buffer.obs[:, 1, 0] = torch.tensor([4.0, -1.0, 0.5])  # env 1: V(s_t) = 4, -1, 0.5
    buffer.rewards[:, 1] = torch.tensor([2.0, 0.5, -1.0])
    buffer.final_obs[2, 1, 0] = 6.0  # env 1's s_T: cut, so R_3 = V(s_3) = 6
    buffer.actions[:, 1] = torch.tensor([1, 0, 1])
    return [(buffer, [a3c.Rollout(0, 0, 2, True, (4.0, 2)), a3c.Rollout(1, 0, 3, False, None)])]


def test_a_batch_of_two_rollouts_of_different_lengths_by_hand():
    """rollout_loss over two rollouts of one buffer, against the arithmetic done here by hand with gamma = 0.5,
    value_coef 1, entropy_coef 0 and zero logits (log pi = -log 2 for every action, entropy log 2).
    The value loss pairs each V(s_t) with its own R_t, so a swap or a shifted split of the two rollouts
    changes it: one such misalignment is worked out below too."""
    batch = two_rollouts_of_different_lengths()
    V = [2.0, 1.0, 4.0, -1.0, 0.5]  # env 0's two steps, then env 1's three
    # lambda = 1, the paper's n-step returns R_t = r_t + gamma R_{t+1}:
    #   env 0, terminated: R_2 = 0, R_1 = 3 + 0.5 * 0 = 3, R_0 = 1 + 0.5 * 3 = 2.5
    #   env 1, cut: R_3 = V(s_3) = 6, R_2 = -1 + 0.5 * 6 = 2, R_1 = 0.5 + 0.5 * 2 = 1.5, R_0 = 2 + 0.5 * 1.5 = 2.75
    R = [2.5, 3.0, 2.75, 1.5, 2.0]
    A = [r - v for r, v in zip(R, V)]  # [0.5, 2, -1.25, 2.5, 1.5]
    value_loss = 0.5 * (0.5 ** 2 + 2.0 ** 2 + 1.25 ** 2 + 2.5 ** 2 + 1.5 ** 2) / 5  # 0.5 * 14.3125 / 5 = 1.43125
    policy_loss = math.log(2) * (0.5 + 2.0 - 1.25 + 2.5 + 1.5) / 5  # -log pi * mean(A) = 1.05 log 2
    loss, stats = a3c.rollout_loss(ValueIsFirstCoordinate(), batch, 0.5, value_coef=1.0, entropy_coef=0.0)
    assert stats["value_loss"] == pytest.approx(1.43125) == pytest.approx(value_loss)
    assert stats["policy_loss"] == pytest.approx(1.05 * math.log(2)) == pytest.approx(policy_loss)
    assert stats["entropy"] == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(value_loss + policy_loss)
    assert stats["explained_variance"] == pytest.approx(1 - np.var(A) / np.var(R))
    # env 1's returns laid before env 0's, against the values in order: R - V = [0.75, 0.5, -2, 3.5, 2.5]
    swapped = 0.5 * (0.75 ** 2 + 0.5 ** 2 + 2.0 ** 2 + 3.5 ** 2 + 2.5 ** 2) / 5  # 2.33125
    assert abs(stats["value_loss"] - swapped) > 0.5

    # lambda = 0, one-step TD targets R_t = r_t + gamma V(s_{t+1}), with V(s_T) as above (0 after the termination):
    #   env 0: R_0 = 1 + 0.5 * 1 = 1.5, R_1 = 3 + 0.5 * 0 = 3
    #   env 1: R_0 = 2 + 0.5 * -1 = 1.5, R_1 = 0.5 + 0.5 * 0.5 = 0.75, R_2 = -1 + 0.5 * 6 = 2
    # R - V = [-0.5, 2, -2.5, 1.75, 1.5]
    _, stats = a3c.rollout_loss(ValueIsFirstCoordinate(), batch, 0.5, 1.0, 0.0, gae_lambda=0.0)
    assert stats["value_loss"] == pytest.approx(0.5 * (0.25 + 4.0 + 6.25 + 3.0625 + 2.25) / 5)  # 1.58125
    assert stats["policy_loss"] == pytest.approx(math.log(2) * (-0.5 + 2.0 - 2.5 + 1.75 + 1.5) / 5)  # 0.45 log 2
    # had env 1's targets been built on env 0's values (a split that does not move on: V = 2, 1, 4), they would be
    # R = [2 + 0.5 * 1, 0.5 + 0.5 * 4, -1 + 0.5 * 6] = [2.5, 2.5, 2]: R - V = [-0.5, 2, -1.5, 3.5, 1.5]
    misaligned = 0.5 * (0.25 + 4.0 + 2.25 + 12.25 + 2.25) / 5  # 2.1
    assert abs(stats["value_loss"] - misaligned) > 0.5


def test_the_batch_loss_is_the_mean_over_every_step_of_every_rollout():
    """Two buffers in one batch: the loss of the batch is the step-weighted mean of the two buffers' losses."""
    one, other = make_rollout(1.0, 3, terminated=True), make_rollout(5.0, 2)
    losses = [a3c.rollout_loss(value_is_first_coordinate, batch, 0.9, 1.0, 0.0)[0].item()
              for batch in ([one], [other], [one, other])]
    assert losses[2] == pytest.approx((3 * losses[0] + 2 * losses[1]) / 5)


# --- GAE ----------------------------------------------------------------------------------------------

def loss_targets(monkeypatch, batch, gamma, lam):
    """The value targets R_t that rollout_loss trains the critic on, for ValueIsFirstCoordinate: the returns it
    hands a3c_loss (A_t = R_t - V(s_t))."""
    seen, a3c_loss = [], a3c.a3c_loss

    def recording(log_probs, entropy, values, returns, *coefs):
        seen.append(returns.clone())
        return a3c_loss(log_probs, entropy, values, returns, *coefs)
    with monkeypatch.context() as patch:
        patch.setattr(a3c, "a3c_loss", recording)
        a3c.rollout_loss(ValueIsFirstCoordinate(), batch, gamma, 0.5, 0.01, gae_lambda=lam)
    (returns,) = seen
    return returns


def test_lambda_one_gives_exactly_the_n_step_returns(monkeypatch):
    """gae_lambda = 1 trains the critic on exactly the paper's n-step returns, and GAE's advantages at lam = 1 are
    the n-step returns minus the values."""
    rng = np.random.default_rng(0)
    rewards, values = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    for terminated, final_value in [(True, 5.0), (False, 1.7)]:
        bootstrap = 0.0 if terminated else float(np.float32(final_value))
        returns = a3c.n_step_returns(rewards, bootstrap, 0.99)
        batch = [rollout_of(values, rewards, final_value, terminated)]
        assert torch.equal(loss_targets(monkeypatch, batch, 0.99, 1.0), returns)
        torch.testing.assert_close(a3c.gae_advantages(rewards, values, bootstrap, 0.99, 1.0),
                                   returns - torch.from_numpy(values))


def test_lambda_zero_gives_one_step_td_targets(monkeypatch):
    rewards, values = np.array([1.0, 0.0, 2.0], np.float32), np.array([0.5, -1.0, 3.0], np.float32)
    targets = torch.tensor([1.0 + 0.5 * -1.0, 0.0 + 0.5 * 3.0, 2.0 + 0.5 * 4.0])  # r_t + gamma V(s_{t+1}), V(s_3) = 4
    torch.testing.assert_close(a3c.gae_advantages(rewards, values, 4.0, 0.5, 0.0), targets - torch.from_numpy(values))
    torch.testing.assert_close(loss_targets(monkeypatch, [rollout_of(values, rewards, 4.0)], 0.5, 0.0), targets)


@pytest.mark.parametrize("bootstrap", [0.0, 4.0], ids=["terminated", "truncated"])
def test_gae_advantages_by_hand(bootstrap, monkeypatch):
    """gamma = 0.5, lam = 0.5, rewards [1, 1, 1], V(s_t) = [1, 2, 3] and V(s_3) = 4 after a truncation (0 after
    a termination): delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t + (gamma lam) A_{t+1}; the critic's
    targets are A_t + V(s_t)."""
    rewards, values = np.ones(3, np.float32), np.array([1.0, 2.0, 3.0], np.float32)
    deltas = [1 + 0.5 * 2 - 1, 1 + 0.5 * 3 - 2, 1 + 0.5 * bootstrap - 3]  # [1, 0.5, -2 + bootstrap / 2]
    a2 = deltas[2]
    a1 = deltas[1] + 0.25 * a2
    a0 = deltas[0] + 0.25 * a1
    advantages = a3c.gae_advantages(rewards, values, bootstrap, 0.5, 0.5)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor([a0, a1, a2]))
    batch = [rollout_of(values, rewards, 4.0, terminated=bootstrap == 0.0)]
    torch.testing.assert_close(loss_targets(monkeypatch, batch, 0.5, 0.5) - torch.from_numpy(values),
                               torch.tensor([a0, a1, a2]))


def test_gae_lambda_flag_reaches_the_loss():
    """With V = s[0] the value loss depends on lam: the flag changes the targets, lam = 1 does not."""
    rollout = make_rollout(1.0, 3)  # V(s_t) = 1, 2, 3 and V(s_3) = 4
    losses = [a3c.rollout_loss(ValueIsFirstCoordinate(), [rollout], 0.5, 1.0, 0.0, gae_lambda=lam)[1]["value_loss"]
              for lam in (1.0, 0.0)]
    # lam = 1: R = [1 + .5 + .25 + .125 * 4, 1.5 + .25 * 4 ... ] = [2.25, 2.5, 3]; lam = 0: R = r + V(s_{t+1}) / 2
    expected = [0.5 * np.mean((np.array([2.25, 2.5, 3.0]) - [1, 2, 3]) ** 2),
                0.5 * np.mean((np.array([2.0, 2.5, 3.0]) - [1, 2, 3]) ** 2)]
    assert losses == pytest.approx(expected)


# --- running statistics: observation and reward normalisation -----------------------------------------

def test_running_statistics_equal_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, (n, 3)) for loc, scale, n in [(5.0, 2.0, 7), (-1.0, 0.5, 1), (0.0, 10.0, 50)]]
    stats = a3c.RunningMeanStd((3,))
    for batch in batches:
        stats.update(batch)
    everything = np.concatenate(batches)
    assert stats.count.item() == 58
    np.testing.assert_allclose(stats.mean.numpy(), everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), everything.var(0), rtol=1e-12)
    x = torch.tensor([[5.0, 0.0, 1e6]])
    expected = np.clip((x.numpy() - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-8), -10, 10)
    np.testing.assert_allclose(stats.normalize(x).numpy(), expected, rtol=1e-5)
    assert stats.normalize(x)[0, 2].item() == 10.0  # clipped


def child_updates_statistics(shared_model):
    shared_model.obs_stats.update(np.full((4, 4), 3.0))
    shared_model.return_stats.update(np.array([1.0, 3.0]))


def test_statistics_updated_in_a_spawned_child_are_seen_by_the_parent():
    shared_model = a3c.ActorCritic(4, 2, hidden=8, normalize_obs=True, normalize_reward=True)
    shared_model.share_memory()
    child = SPAWN.Process(target=child_updates_statistics, args=(shared_model,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert shared_model.obs_stats.count.item() == 4 and torch.equal(shared_model.obs_stats.mean,
                                                                    torch.full((4,), 3.0, dtype=torch.float64))
    assert shared_model.return_stats.var.item() == 1.0 and shared_model.reward_normalization() == pytest.approx(1.0)
    # and a worker's local model reads them at its next sync
    local_model = a3c.ActorCritic(4, 2, hidden=8, normalize_obs=True, normalize_reward=True)
    local_model.load_state_dict(shared_model.state_dict())
    assert torch.equal(local_model.obs_stats.mean, shared_model.obs_stats.mean)


def test_update_statistics_folds_in_observations_and_discounted_returns_reset_at_episode_ends():
    model = a3c.ActorCritic(2, 2, hidden=8, normalize_obs=True, normalize_reward=True)
    buffer = a3c.RolloutBuffer.allocate(model, 3, 2)
    buffer.obs[:] = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)
    buffer.rewards[:] = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    # env 0's episode ends after step 0 (terminated); env 1's rollout is cut by n_steps, no episode ends
    rollouts = [a3c.Rollout(0, 0, 1, True, (5.0, 5)), a3c.Rollout(1, 0, 3, False, None),
                a3c.Rollout(0, 1, 3, False, None)]
    discounted = np.array([10.0, 0.0])  # env 0 carries G = 10 from its previous rollout
    a3c.update_statistics(model, buffer, rollouts, discounted, 0.5)
    seen = [0.5 * 10 + 1, 1, 1.5, 2, 3, 3.5]  # env 0: 6, then reset: 1, 1.5; env 1: 2, 3, 3.5
    assert model.return_stats.mean.item() == pytest.approx(np.mean(seen))
    assert model.return_stats.var.item() == pytest.approx(np.var(seen))
    np.testing.assert_allclose(discounted, [1.5, 3.5])  # carried on to the next rollout
    np.testing.assert_allclose(model.obs_stats.mean.numpy(), np.arange(12).reshape(6, 2).mean(0))


def test_reward_normalisation_changes_what_the_critic_learns():
    """With a zero value head, value_loss = mean(R^2) / 2, and R scales with the reward: a running std of 2
    quarters the loss."""
    plain = a3c.ActorCritic(2, 2, hidden=8)
    scaled = a3c.ActorCritic(2, 2, hidden=8, normalize_reward=True)
    scaled.load_state_dict(plain.state_dict(), strict=False)
    scaled.return_stats.update(np.array([-2.0, 2.0]))  # std 2
    for model in (plain, scaled):
        with torch.no_grad():
            model.value.weight.zero_()
            model.value.bias.zero_()
    rollout = make_rollout(1.0, 3, terminated=True)
    losses = [a3c.rollout_loss(model, [rollout], 0.9, 1.0, 0.0)[1]["value_loss"] for model in (plain, scaled)]
    assert losses[1] == pytest.approx(losses[0] / 4, rel=1e-6)


def save_small_checkpoint(path, steps=0, env="CartPole-v1", model=None):
    args = a3c.parse_args(["--hidden", "16", "--env", env, "--target-return", "-200"])
    a3c.prepare(args)
    model = model or a3c.ActorCritic(4, 2, 16)
    assert a3c.save_checkpoint(str(path), model, torch.optim.Adam(model.parameters()), args, steps, 0, [])
    return model


def test_normalised_run_keeps_true_returns_and_its_statistics_round_trip(tmp_path, monkeypatch, capsys):
    """Rewards scaled for learning only: the CSV still has CartPole's true returns (1 per step). The statistics
    count every observation the workers saw, come back with --resume and keep counting; --eval reads them
    and never updates them."""
    path, csv_path = str(tmp_path / "model.pth"), tmp_path / "episodes.csv"
    common = ["--workers", "1", "--hidden", "16", "--save", path, "--target-return", "1e9"]
    assert a3c.main([*common, "--max-steps", "3000", "--normalize-obs", "--normalize-reward",
                     "--log-csv", str(csv_path)]) == 0
    rows = [row.split(",") for row in csv_path.read_text().splitlines()[1:]]
    assert rows and all(float(row[3]) == int(row[4]) for row in rows)
    first = a3c.load_checkpoint(path)
    assert first["normalize_obs"] and first["normalize_reward"]
    assert first["model"]["obs_stats.count"].item() == first["steps"] == first["model"]["return_stats.count"].item()
    assert first["model"]["return_stats.var"].item() > 1.0  # CartPole's discounted returns grow past 1
    # --resume takes the checkpoint's flags and continues the statistics
    assert a3c.main(["--resume", path, *common, "--max-steps", "6000", "--mode", "data"]) == 0
    second = a3c.load_checkpoint(path)
    assert second["model"]["obs_stats.count"].item() == second["steps"] >= 6000
    # --eval: the statistics are read (normalisation on) and frozen
    monkeypatch.setattr(a3c.RunningMeanStd, "update", lambda self, batch: pytest.fail("--eval updated statistics"))
    normalized = []
    monkeypatch.setattr(a3c.RunningMeanStd, "normalize", lambda self, x, clip=10.0: normalized.append(1) or x)
    before = (tmp_path / "model.pth").read_bytes()
    assert a3c.main(["--eval", path, "--episodes", "2"]) == 0
    assert normalized and (tmp_path / "model.pth").read_bytes() == before
    # a statistic cannot be added to a model trained without it
    capsys.readouterr()
    save_small_checkpoint(tmp_path / "plain.pth")
    assert a3c.main(["--eval", str(tmp_path / "plain.pth"), "--normalize-obs"]) == 2
    assert "trained without --normalize-obs" in capsys.readouterr().err


def test_separate_critic_keeps_the_value_loss_out_of_the_policy_torso():
    torch.manual_seed(0)
    obs = torch.randn(5, 3)
    for separate in (False, True):
        model = a3c.ActorCritic(3, 2, hidden=8, continuous=True, separate_critic=separate, log_std_init=-0.5)
        assert torch.equal(model.policy.log_std.detach(), torch.full((2,), -0.5))
        _, values, _ = model(obs)
        values.pow(2).sum().backward()
        policy_torso_grad = sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in model.torso.parameters())
        assert (policy_torso_grad == 0.0) == separate
        if separate:
            assert all(p.grad.abs().sum() > 0 for p in model.critic_torso.parameters())


def test_reward_scale_default_is_not_applied_on_top_of_reward_normalisation():
    scales = []
    for flags in ([], ["--normalize-reward"], ["--normalize-reward", "--reward-scale", "0.5"]):
        args = a3c.parse_args(flags)
        a3c.prepare(args)
        scales.append(args.reward_scale)
    assert scales == [0.1, 1.0, 0.5]


# --- the Gaussian policy (Box actions) ----------------------------------------------------------------

def gaussian_head(log_std):
    head = a3c.GaussianHead(1, len(log_std))
    with torch.no_grad():
        head.log_std.copy_(torch.as_tensor(log_std, dtype=torch.float32))
    return head


def test_gaussian_log_prob_and_entropy_equal_torch_normal_summed_over_dimensions():
    mean = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]])
    log_std = torch.tensor([0.0, -1.0, 0.7])
    actions = torch.tensor([[0.3, 1.0, -5.0], [2.0, -0.2, 3.1]])
    log_probs, entropy = gaussian_head(log_std).log_prob_entropy(mean, actions)
    normal = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(log_probs, normal.log_prob(actions).sum(-1))
    torch.testing.assert_close(entropy, normal.entropy().sum(-1))
    # by hand, one dimension: N(0.3; 0, 1) and H = (1 + log 2 pi) / 2 + log 1
    one, one_entropy = gaussian_head([0.0]).log_prob_entropy(torch.zeros(1, 1), torch.tensor([[0.3]]))
    assert one.item() == pytest.approx(-0.045 - 0.5 * np.log(2 * np.pi))
    assert one_entropy.item() == pytest.approx(0.5 * (1 + np.log(2 * np.pi)))


def gaussian_sgd_step(advantage, entropy_coef=0.0, lr=0.1):
    """One SGD step on a one-step, one-dimension Gaussian policy: mean 0, sigma 1, sampled action 1."""
    head, mean = gaussian_head([0.0]), torch.zeros(1, 1, requires_grad=True)
    log_probs, entropy = head.log_prob_entropy(mean, torch.tensor([[1.0]]))
    a3c.a3c_loss(log_probs, entropy, torch.zeros(1), torch.tensor([advantage]), 0.0, entropy_coef)[0].backward()
    with torch.no_grad():
        return (mean - lr * mean.grad).item(), (head.log_std - lr * head.log_std.grad).item()


def test_gaussian_positive_advantage_moves_mean_towards_the_sampled_action():
    assert gaussian_sgd_step(advantage=2.0)[0] > 0.0  # towards the action 1.0
    assert gaussian_sgd_step(advantage=-2.0)[0] < 0.0  # away from it


def test_gaussian_entropy_bonus_raises_the_standard_deviation():
    # zero advantage: only the entropy term moves sigma
    assert gaussian_sgd_step(advantage=0.0, entropy_coef=1.0)[1] > 0.0
    assert gaussian_sgd_step(advantage=0.0, entropy_coef=0.0)[1] == 0.0


def test_gaussian_head_samples_around_the_mean_and_plays_the_mean():
    model = a3c.ActorCritic(2, 2, hidden=8, continuous=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.policy.out.bias.copy_(torch.tensor([1.0, -3.0]))
        model.policy.log_std.copy_(torch.tensor([0.0, np.log(0.5)]))
    with torch.inference_mode():  # as collect_rollouts samples: the head's output, then the head's sample
        means, _, _ = model(torch.zeros(20000, 2), model.initial_core_state(20000))
    actions = model.policy.sample(means.numpy(), np.random.default_rng(0))
    assert actions.dtype == np.float32 and actions.shape == (20000, 2)
    np.testing.assert_allclose(actions.mean(0), [1.0, -3.0], atol=0.03)  # linear means, not clipped here
    np.testing.assert_allclose(actions.std(0), [1.0, 0.5], rtol=0.03)
    with torch.inference_mode():
        mean, _, _ = model(torch.zeros(1, 2))
    np.testing.assert_allclose(mean.numpy(), [[1.0, -3.0]], rtol=1e-6)
    np.testing.assert_array_equal(model.policy.most_probable(mean.numpy()), mean.numpy())  # --eval plays the mean


def test_bound_loss_is_zero_inside_the_box_and_pulls_a_mean_outside_back():
    head = gaussian_head([0.0, 0.0])
    assert head.bound_loss(torch.tensor([[0.5, -1.0], [1.0, 0.0]])).item() == 0.0
    mean = torch.tensor([[3.0, -0.2], [0.0, -5.0]], requires_grad=True)
    loss = head.bound_loss(mean)
    assert loss.item() == pytest.approx((2.0 ** 2 + 4.0 ** 2) / 2)  # (|mu| - 1)^2 past the box, mean over steps
    loss.backward()
    torch.testing.assert_close(mean.grad, torch.tensor([[2.0, 0.0], [0.0, -4.0]]))  # descent: back towards the box
    # a tanh-bounded mean that far out would get almost no gradient at all
    pre = torch.tensor([6.0], requires_grad=True)
    torch.tanh(pre).sum().backward()
    assert pre.grad.item() < 1e-4


def test_the_loss_both_modes_train_with_includes_the_heads_bound_loss(monkeypatch):
    for kind in ["gaussian", "categorical"]:
        model, batch = small_model(kind), fixed_rollout(kind)
        loss, _ = a3c.rollout_loss(model, batch, 0.9, 0.5, 0.01)
        monkeypatch.setattr(type(model.policy), "bound_loss", lambda self, head_out: 7.0)
        assert a3c.rollout_loss(model, batch, 0.9, 0.5, 0.01)[0].item() == pytest.approx(loss.item() + 7.0)
        monkeypatch.undo()


class RecordingBoxEnv(gym.Env):
    """Actions in [-1, 1] x [0, 4]; records every action it receives."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 4.0], np.float32))

    def __init__(self, render_mode=None):
        self.received = []

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.received.append(np.array(action))
        return np.zeros(2, np.float32), 0.0, False, len(self.received) % 7 == 0, {}


class MatrixActionEnv(RecordingBoxEnv):
    action_space = gym.spaces.Box(-1.0, 1.0, (2, 2), np.float32)


class UnboundedActionEnv(RecordingBoxEnv):
    action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


gym.register("RecordingBox-v0", entry_point=RecordingBoxEnv, disable_env_checker=True)
gym.register("MatrixAction-v0", entry_point=MatrixActionEnv, disable_env_checker=True)
gym.register("UnboundedAction-v0", entry_point=UnboundedActionEnv, disable_env_checker=True)


def test_box_actions_reach_the_env_clipped_while_the_rollout_keeps_the_samples():
    env = a3c.make_env("RecordingBox-v0", seed=0)
    model = a3c.ActorCritic(2, 2, hidden=8, continuous=True)
    with torch.no_grad():
        model.policy.log_std.fill_(np.log(3.0))  # sigma 3: most samples fall outside the policy's box [-1, 1]
    obs = np.stack([env.reset(seed=0)[0]])
    _, rollouts = collect([env], model, obs, 20)
    sampled = np.concatenate([r.actions for r in rollouts])  # [20, 2]
    received = np.stack(env.unwrapped.received)
    assert sampled.dtype == np.float32 and sampled.shape == (20, 2)
    assert np.abs(sampled).max() > 1.0  # the rollout keeps the out-of-bounds samples ...
    # ... while the env sees them clipped to [-1, 1], then mapped onto its own bounds
    np.testing.assert_allclose(received[:, 0], np.clip(sampled[:, 0], -1.0, 1.0), rtol=1e-6)
    np.testing.assert_allclose(received[:, 1], 2.0 * (np.clip(sampled[:, 1], -1.0, 1.0) + 1.0), rtol=1e-6)
    assert received[:, 1].min() >= 0.0 and received[:, 1].max() <= 4.0


def test_infinite_action_bounds_are_refused():
    with pytest.raises(ValueError, match="infinite bounds"):
        a3c.make_env("UnboundedAction-v0")


# --- data path ----------------------------------------------------------------------------------------

def start_data_worker(args, shared_model, version=0):
    """Data worker 0 in a spawned process, run by worker_process as train() runs it, with two shared rollout
    buffers, as the learner would start it. Everything it was given is returned, so that nothing is collected
    before the child has unpickled it."""
    buffers = [a3c.RolloutBuffer.allocate(shared_model, args.n_steps, args.envs_per_worker, shared=True)
               for _ in range(2)]
    free_buffers = SPAWN.Semaphore(2)
    policy_version, worker_steps, stop_event = SPAWN.Value("q", version), a3c.StepCounter(SPAWN, 1), SPAWN.Event()
    messages = SPAWN.Queue()
    worker = SPAWN.Process(target=a3c.worker_process, daemon=True,
                           args=(0, a3c.data_worker, args, a3c.run_seeds(0, 0, 1, args.envs_per_worker)[0],
                                 (shared_model, policy_version, buffers, free_buffers), worker_steps, messages,
                                 stop_event, os.getpid()))
    worker.start()
    return worker, buffers, free_buffers, policy_version, worker_steps, messages, stop_event


def test_data_worker_fills_shared_buffers_sends_small_messages_and_waits_for_free_buffers():
    args = a3c.parse_args(["--n-steps", "7", "--hidden", "16", "--envs-per-worker", "3"])
    a3c.prepare(args)
    shared_model = a3c.ActorCritic(4, 2, 16)
    shared_model.share_memory()
    worker, buffers, free_buffers, _, worker_steps, messages, stop_event = start_data_worker(args, shared_model, 3)

    def read(message):  # what the learner does: the rollouts a message marks out, copied here to keep them
        _, index, _, rollouts = message
        copied = a3c.RolloutBuffer(*(field.clone() for field in buffers[index]))
        return [steps_of(copied, r) for r in rollouts]

    try:
        received = [messages.get(timeout=60) for _ in range(2)]
        # Both buffers are the learner's now: the worker must not write into either until one comes back,
        # so what the first message marks out is still there after the second has arrived.
        rollouts = [read(message) for message in received]
        free_buffers.release()  # the learner is done with the oldest one, buffer 0
        received.append(messages.get(timeout=60))
        rollouts.append(read(received[2]))
    finally:
        stop_event.set()
        a3c.stop_processes([worker], [messages])
    assert worker.exitcode == 0
    assert [index for _, index, _, _ in received] == [0, 1, 0]  # buffers are reused in the order sent
    # a plain tuple (rank, index, version, rollouts)
    assert all(type(message) is tuple and len(message) == 4 and message[0] == 0 and message[2] == 3
               for message in received)
    for message in received:
        assert len(pickle.dumps(message)) < 4096  # under PIPE_BUF: the pipe takes each in one atomic write
    for message_rollouts in rollouts:
        assert sum(len(r.rewards) for r in message_rollouts) == 7 * 3
        for r in message_rollouts:
            assert type(r.rollout) is a3c.Rollout
            if r.episode is None:  # not ended with its episode: cut by n_steps, and bootstrapped
                assert not r.terminated and r.stop == 7
            T = len(r.rewards)
            assert 1 <= T <= 7 and r.obs.shape == (T, 4) and r.actions.shape == (T,) and r.final_obs.shape == (4,)
            assert r.obs.dtype == np.float32 and r.actions.dtype == np.int64 and set(r.actions.tolist()) <= {0, 1}
    # each env's rollout cut by n_steps ends on the observation its next rollout, in the next message, starts from
    checked = 0
    for earlier_rollouts, later_rollouts in zip(rollouts, rollouts[1:]):
        starts = {r.env_index: r.obs[0] for r in later_rollouts if r.start == 0}
        for r in earlier_rollouts:
            if r.stop == 7 and r.episode is None:
                np.testing.assert_array_equal(r.final_obs, starts[r.env_index])
                checked += 1
    assert checked >= 3 and worker_steps.total() >= 3 * 7 * 3


# --- recurrent state (--lstm) -------------------------------------------------------------------------

def lstm_model(obs_size=2, hidden=16, **kwargs):
    torch.manual_seed(0)
    return a3c.ActorCritic(obs_size, 2, hidden=hidden, lstm=True, **kwargs)


def record_passes(model):
    """Wrap model.forward so that every call is kept: an acting one (one step of each env, no lengths) as its
    head outputs and values; a learning one (sequences, with lengths) as the core state after each sequence,
    which learning_pass uses for V(s_T) and does not return. Its own pass for V(s_T) has no lengths either."""
    acting, learning, forward = [], [], model.forward

    def recording(obs, core_state=None, lengths=None):
        out = forward(obs, core_state, lengths)
        if lengths is None:
            acting.append((out[0].clone(), out[1].clone()))
        else:
            learning.append(out[2].clone())
        return out
    model.forward = recording
    return acting, learning


def gathered(per_step, rollouts):
    """Acting outputs [n_steps][K, ...] laid out as learning_pass lays them: each Rollout's steps in turn."""
    stacked = torch.stack(per_step)  # [n_steps, K, ...]
    return torch.cat([stacked[r.start:r.stop, r.env_index] for r in rollouts])


def test_the_learning_pass_reproduces_the_acting_pass_step_for_step_across_episode_ends():
    """With the weights unchanged, learning_pass (the loss's forward pass) gives the logits and values that chose
    the actions, at every step of three consecutive rollouts in which episodes end and restart: only if the
    state is zeroed at each episode start, carried from rollout to rollout and replayed from the stored one.
    And V(s_T) of a rollout cut by n_steps is the value acting gives the next rollout's first step."""
    model = lstm_model()
    envs = [gym.wrappers.RecordEpisodeStatistics(CountingEnv(end_at=end)) for end in (3, 7)]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    core_state = model.initial_core_state(2).numpy()
    buffer, rng = a3c.RolloutBuffer.allocate(model, 5, 2), np.random.default_rng(0)
    acting, learning = record_passes(model)
    restarts, next_values = 0, {}
    for _ in range(3):
        acting.clear()
        learning.clear()
        rollouts = a3c.collect_rollouts(envs, model, obs, core_state, buffer, rng)
        acted = list(acting)  # one call per step
        assert len(acted) == 5
        for env, value in next_values.items():
            torch.testing.assert_close(acted[0][1][env], value, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            head_out, values, final_values = a3c.learning_pass(model, [(buffer, r) for r in rollouts])
        torch.testing.assert_close(head_out, gathered([c[0] for c in acted], rollouts), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(values, gathered([c[1] for c in acted], rollouts), rtol=1e-5, atol=1e-6)
        restarts += sum(r.start > 0 for r in rollouts)
        # where no episode ended, the state after the rollout is the one the next rollout starts from
        (final_states,) = learning
        next_values = {}
        for r, final, final_value in zip(rollouts, final_states.numpy(), final_values):
            if r.stop == 5 and r.episode is None:
                np.testing.assert_allclose(core_state[r.env_index], final, rtol=1e-5, atol=1e-6)
                next_values[r.env_index] = final_value
    assert restarts >= 3  # episodes did end inside rollouts


def test_a_replay_from_the_zero_state_would_not_match():
    """The check above can fail: a learner that replayed from zero instead of the worker's state differs."""
    model = lstm_model()
    envs = [gym.wrappers.RecordEpisodeStatistics(CountingEnv(end_at=50)) for _ in range(2)]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    core_state = model.initial_core_state(2).numpy()
    buffer, rng = a3c.RolloutBuffer.allocate(model, 5, 2), np.random.default_rng(0)
    a3c.collect_rollouts(envs, model, obs, core_state, buffer, rng)
    rollouts = a3c.collect_rollouts(envs, model, obs, core_state, buffer, rng)  # the second: its state is not zero
    zeroed = buffer._replace(core_state=torch.zeros_like(buffer.core_state))
    with torch.no_grad():
        _, values, _ = a3c.learning_pass(model, [(buffer, r) for r in rollouts])
        _, from_zero, _ = a3c.learning_pass(model, [(zeroed, r) for r in rollouts])
    assert (values - from_zero).abs().max() > 1e-3


def test_the_state_is_zero_at_every_episode_start_and_carried_otherwise():
    model = lstm_model()
    envs = [gym.wrappers.RecordEpisodeStatistics(CountingEnv(end_at=end)) for end in (2, 3)]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    core_state = model.initial_core_state(2).numpy()
    buffer, rng = a3c.RolloutBuffer.allocate(model, 6, 2), np.random.default_rng(0)
    rollouts = a3c.collect_rollouts(envs, model, obs, core_state, buffer, rng)
    for r in rollouts:  # every piece here starts an episode (the first at reset, the others after an end)
        assert not buffer.core_state[r.start, r.env_index].any()
        assert all(buffer.core_state[t, r.env_index].any() for t in range(r.start + 1, r.stop))
    # the episode of env 1 is cut by n_steps after 6 = 2 * 3 steps: its next one starts at zero too; env 0's too
    assert not core_state.any()
    envs[1].unwrapped.end_at = 100
    rollouts = a3c.collect_rollouts(envs, model, obs, core_state, buffer, rng)
    # env 1 now runs through the whole rollout: its carried state is the one after the buffer's last step
    _, learning = record_passes(model)
    with torch.no_grad():
        a3c.learning_pass(model, [(buffer, r) for r in rollouts if r.env_index == 1])
    np.testing.assert_allclose(core_state[1], learning[0][0].numpy(), rtol=1e-5, atol=1e-6)
    assert core_state[1].any()


def test_no_gradient_reaches_the_previous_rollout():
    """Truncated backpropagation: a rollout's loss depends on the rollout before only through the state it
    starts from, which is data. Scrambling the earlier rollout's observations changes nothing; changing the
    stored state does (so it is used)."""
    model = lstm_model()
    envs = [gym.wrappers.RecordEpisodeStatistics(CountingEnv(end_at=50)) for _ in range(2)]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    core_state = model.initial_core_state(2).numpy()
    first, second = (a3c.RolloutBuffer.allocate(model, 5, 2) for _ in range(2))
    rng = np.random.default_rng(0)
    a3c.collect_rollouts(envs, model, obs, core_state, first, rng)
    rollouts = a3c.collect_rollouts(envs, model, obs, core_state, second, rng)

    def gradient(buffer):
        model.zero_grad()
        loss, _ = a3c.rollout_loss(model, [(buffer, rollouts)], 0.99, 0.5, 0.01)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]
    assert not second.core_state.requires_grad
    before = gradient(second)
    first.obs[:] = 1e3  # the rollout before, scrambled
    for g, h in zip(before, gradient(second)):
        assert torch.equal(g, h)
    moved = gradient(second._replace(core_state=second.core_state + 1.0))
    assert any(not torch.equal(g, h) for g, h in zip(before, moved))


def test_rollouts_of_unequal_length_are_batched_as_if_run_one_by_one():
    model = lstm_model(obs_size=3)
    rng = np.random.default_rng(1)
    buffer = a3c.RolloutBuffer.allocate(model, 4, 3)
    for field in (buffer.obs, buffer.final_obs, buffer.core_state):
        field.copy_(torch.from_numpy(rng.standard_normal(field.shape).astype(np.float32)))
    # lengths 4, 1 and 3, starting at different rows
    pairs = [(buffer, a3c.Rollout(0, 0, 4, False, None)), (buffer, a3c.Rollout(1, 2, 3, False, None)),
             (buffer, a3c.Rollout(2, 1, 4, False, None))]
    _, learning = record_passes(model)
    head_out, values, final_values = a3c.learning_pass(model, pairs)
    assert values.requires_grad and not final_values.requires_grad  # V(s_T) is part of the target
    alone = [a3c.learning_pass(model, [pair]) for pair in pairs]
    states, alone_states = learning[0], learning[1:]
    torch.testing.assert_close(head_out, torch.cat([a[0] for a in alone]))
    torch.testing.assert_close(values, torch.cat([a[1] for a in alone]))
    torch.testing.assert_close(final_values, torch.cat([a[2] for a in alone]))
    torch.testing.assert_close(states, torch.cat(alone_states))
    # and one at a time, step by step, as acting runs them
    h = buffer.core_state[0, 0][None]
    for t in range(4):
        out, value, h = model(buffer.obs[t:t + 1, 0], h)
        torch.testing.assert_close(value, values[t:t + 1])
    torch.testing.assert_close(h, states[:1])
    torch.testing.assert_close(model(buffer.final_obs[3:4, 0], h)[1], final_values[:1])


def test_data_worker_stores_the_states_it_acted_with_and_the_learner_replays_them():
    """Data mode: a spawned worker acts with an LSTM into shared buffers. Stepping the same weights through
    the same observations, from the state the first rollout starts with and zero at each episode start,
    gives the states the worker stored; replaying the rollouts from the stored states gives those outputs."""
    args = a3c.parse_args(["--n-steps", "30", "--hidden", "16", "--envs-per-worker", "2", "--lstm"])
    a3c.prepare(args)
    shared_model = lstm_model(obs_size=4)
    shared_model.share_memory()
    worker, buffers, *_, messages, stop_event = start_data_worker(args, shared_model)
    try:
        received = [messages.get(timeout=60) for _ in range(2)]
    finally:
        stop_event.set()
        a3c.stop_processes([worker], [messages])
    assert worker.exitcode == 0
    core_state = torch.zeros(2, 32)  # each env's first episode starts from zero
    for _, index, _, rollouts in received:
        buffer = buffers[index]
        ends = {(r.stop - 1, r.env_index) for r in rollouts if r.episode is not None}
        step_by_step = []
        with torch.no_grad():
            for t in range(30):
                np.testing.assert_allclose(buffer.core_state[t].numpy(), core_state.numpy(), rtol=1e-5, atol=1e-6)
                head_out, values, core_state = shared_model(buffer.obs[t], core_state)
                step_by_step.append(values)
                for k in range(2):
                    if (t, k) in ends:
                        core_state[k] = 0.0
            _, replayed, _ = a3c.learning_pass(shared_model, [(buffer, r) for r in rollouts])
        torch.testing.assert_close(replayed, gathered(step_by_step, rollouts), rtol=1e-5, atol=1e-6)
    assert any(r.start > 0 for _, _, _, rollouts in received for r in rollouts)  # an episode started inside one


# --- whole runs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gradient", "data"])
def test_short_run_stops_cleanly(mode, tmp_path):
    args = a3c.parse_args(["--workers", "2", "--mode", mode, "--max-steps", "2000", "--hidden", "16",
                           "--save", str(tmp_path / "model.pth")])
    a3c.prepare(args)
    summary = a3c.train(args)
    assert summary["steps"] >= 2000 and not summary["solved"] and summary["exit_code"] == 0
    assert SPAWN.active_children() == [] and multiprocessing.active_children() == []
    checkpoint = a3c.load_checkpoint(str(tmp_path / "model.pth"))
    assert checkpoint["steps"] == summary["steps"] and checkpoint["episodes"] == summary["episodes"]
    assert set(checkpoint["model"]) == set(a3c.ActorCritic(4, 2, 16).state_dict())


# --- pixels: preprocessing, conv torso, Atari ---------------------------------------------------------

def test_image_observations_become_stacked_uint8_frames_and_the_conv_torso_fits():
    env = a3c.make_env("SideImage-v0")
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.uint8 and obs.shape == (FRAME_STACK, 42, 42)
    assert a3c.env_spaces(env)["obs_size"] == (FRAME_STACK, 42, 42)
    # the standard Atari input: 210x160 screens become 4 stacked 105x80 frames
    model = a3c.ActorCritic((FRAME_STACK, 105, 80), 6, hidden=256)
    head_out, values, _ = model(torch.zeros(3, FRAME_STACK, 105, 80, dtype=torch.uint8))
    assert head_out.shape == (3, 6) and values.shape == (3,)
    assert isinstance(model.torso, a3c.ConvTorso) and model.torso.fc.out_features == 256


def test_downsampling_averages_2x2_blocks_of_the_screen():
    env = a3c.make_env("StepImage-v0")
    env.reset(seed=0)
    frame = env.unwrapped.frame().copy()
    frame[0:2, 0:2] = [[0, 1], [2, 5]]  # block mean 2
    downsample = env.env.func  # the TransformObservation inside the frame stack
    small = downsample(frame)
    assert small.dtype == np.uint8 and small.shape == (42, 42) and small[0, 0] == 2 and small[1, 1] == 255


class FlickerImageEnv(gym.Env):
    """An emulator that shows every frame (frameskip=1, as ALE's NoFrameskip ids): a bright square on odd frames
    only, reward 0.1 a frame, 40 frames an episode."""
    observation_space = gym.spaces.Box(0, 255, (8, 8), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None, frameskip=1):
        self.frame_number = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.frame_number = 0
        return np.zeros((8, 8), np.uint8), {}

    def step(self, action):
        self.frame_number += 1
        pixels = np.full((8, 8), 200 if self.frame_number % 2 else 0, np.uint8)
        return pixels, 0.1, False, self.frame_number >= 40, {}


gym.register("FlickerImage-v0", entry_point=FlickerImageEnv, disable_env_checker=True, kwargs={"frameskip": 1})


def test_an_env_that_shows_every_frame_gets_frame_skip_4_with_the_max_of_the_last_two():
    env = a3c.make_env("FlickerImage-v0")
    env.reset(seed=0)
    for step in range(10):
        obs, reward, terminated, truncated, info = env.step(0)
        assert obs.shape == (FRAME_STACK, 4, 4) and (obs[-1] == 200).all()  # frames 3 and 4: one has it
        assert reward == pytest.approx(0.4)  # the 4 frames' rewards, summed
    assert truncated and not terminated
    assert info["episode"]["l"] == 10 and info["episode"]["r"] == pytest.approx(4.0)  # agent steps; the score
    assert (a3c.make_env("SideImage-v0").reset(seed=0)[0].shape == (FRAME_STACK, 42, 42))  # no frameskip: as is


def test_pixel_rollouts_hold_uint8_frames_and_bootstrap_from_the_last_frames_of_the_episode():
    env = a3c.make_env("StepImage-v0")
    model = a3c.ActorCritic((FRAME_STACK, 42, 42), 2, hidden=16)
    obs = a3c.observation_batch([env.reset(seed=0)[0]])
    buffer, (ended, cut) = collect([env], model, obs, 25)
    assert not ended.terminated and ended.episode is not None  # ended by truncation
    assert len(ended.rewards) == 20 and ended.episode[1] == 20
    assert buffer.obs.dtype == torch.uint8 and buffer.final_obs.dtype == torch.uint8
    for r in (ended, cut):
        assert r.obs.dtype == np.uint8 and r.final_obs.dtype == np.uint8 and r.obs.shape[1:] == (4, 42, 42)
    # s_T of the truncated episode holds its last four frames (steps 17..20), not the reset frame
    np.testing.assert_array_equal(ended.final_obs[:, 0, 0], [170, 180, 190, 200])
    np.testing.assert_array_equal(cut.obs[0][:, 0, 0], [255, 255, 255, 255])  # the next piece starts on reset
    # the loss reads frames: one forward pass over s_0 .. s_{T-1} of each rollout, one over their s_T
    rollouts = [ended.rollout, cut.rollout]
    head_out, values, final_values = a3c.learning_pass(model, [(buffer, r) for r in rollouts])
    assert head_out.shape == (25, 2) and values.shape == (25,) and final_values.shape == (2,)
    loss, _ = a3c.rollout_loss(model, [(buffer, rollouts)], 0.99, 0.5, 0.01)
    loss.backward()
    assert model.torso.fc.weight.grad is not None


def test_video_without_moviepy_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "moviepy", None)  # import now fails as if not installed
    save_small_checkpoint(tmp_path / "cartpole.pth")
    assert a3c.main(["--eval", str(tmp_path / "cartpole.pth"), "--video", str(tmp_path / "videos")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install moviepy" in err, err
    assert not (tmp_path / "videos").exists()


def test_atari_id_without_ale_py_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # import now fails as if not installed
    assert a3c.main(["--env", "ALE/Pong-v5", "--save", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gymnasium[atari]'" in err, err


@pytest.mark.parametrize("mode, flags", [("gradient", []), ("data", []), ("data", ["--lstm", "--frame-stack", "1"])])
def test_short_pong_run_exits_cleanly(mode, flags, tmp_path):
    match = run_cli("--env", "ALE/Pong-v5", "--mode", mode, "--workers", "2", "--envs-per-worker", "2",
                    "--n-steps", "5", "--hidden", "32", "--max-steps", "1500", "--target-return", "18",
                    "--save", str(tmp_path / "pong.pth"), *flags, timeout=120)
    assert int(match.group(3)) >= 1500 and match.group(1) == "no"
    assert multiprocessing.active_children() == []
    checkpoint = a3c.load_checkpoint(str(tmp_path / "pong.pth"))
    assert checkpoint["obs_size"] == (1 if flags else FRAME_STACK, 105, 80) and checkpoint["n_actions"] == 6
    assert checkpoint["lstm"] == bool(flags)


class MarkResets(gym.Wrapper):
    """Notes each reset in a list that the observations the policy sees are also written to."""

    def __init__(self, env, seen):
        super().__init__(env)
        self.seen = seen

    def reset(self, **kwargs):
        self.seen.append(None)
        return self.env.reset(**kwargs)


def test_evaluation_on_a_deterministic_atari_env_does_not_replay_one_game(tmp_path, monkeypatch, capsys):
    """Without sticky actions the emulator replays the same game from every reset whatever the seed: each --eval
    episode starts with its own number of no-ops, so the first screens the policy sees in three episodes are not one
    screen three times (a policy may still steer them onto one game; the README says so). Envs whose seed already
    varies the start get none."""
    assert a3c.plays_one_game(a3c.make_env("PongNoFrameskip-v4"))
    assert not any(a3c.plays_one_game(a3c.make_env(env_id)) for env_id in ("ALE/Pong-v5", "CartPole-v1"))
    path = tmp_path / "pong.pth"
    save_small_checkpoint(path, env="PongNoFrameskip-v4", model=a3c.ActorCritic((4, 105, 80), 6, 16))
    seen, make_env, observation_batch = [], a3c.make_env, a3c.observation_batch
    monkeypatch.setattr(a3c, "make_env", lambda *args, **kwargs: MarkResets(make_env(*args, **kwargs), seen))
    monkeypatch.setattr(a3c, "observation_batch", lambda obs: seen.append(obs[0].copy()) or observation_batch(obs))
    assert a3c.main(["--eval", str(path), "--episodes", "3"]) == 0
    firsts = [seen[i + 1] for i in range(len(seen) - 1) if seen[i] is None and seen[i + 1] is not None]
    assert len(firsts) == 3 and len({first.tobytes() for first in firsts}) > 1


# --- MuJoCo -------------------------------------------------------------------------------------------

def test_a_mujoco_run_writes_no_log_file_and_shows_each_warning_once(tmp_path, monkeypatch, capfd):
    """Left alone, MuJoCo writes its warnings to MUJOCO_LOG.TXT in the working directory. HalfCheetah's XML uses
    the deprecated settotalmass, which warns each time the model is compiled: here four times (prepare, train,
    and the worker's two envs, in a forked process); a3c.py prints it on stderr, once."""
    import mujoco
    mujoco.set_mju_user_warning(None)  # as in a fresh process: an earlier test may have installed a3c.py's
    monkeypatch.chdir(tmp_path)
    assert a3c.main(["--env", "HalfCheetah-v5", "--workers", "1", "--envs-per-worker", "2", "--n-steps", "5",
                     "--hidden", "16", "--max-steps", "100", "--target-return", "1e9", "--save", "m.pth"]) == 0
    err = capfd.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["m.pth"]  # no MUJOCO_LOG.TXT
    assert err.count("settotalmass") == 1 and err.startswith("a3c.py: MuJoCo warning: "), err


# --- diagnostics: statistics, progress line, TensorBoard ----------------------------------------------

def test_explained_variance_by_hand():
    returns = torch.tensor([0.0, 2.0, 4.0])
    assert type(a3c.explained_variance(returns.clone(), returns)) is float
    assert a3c.explained_variance(returns.clone(), returns) == 1.0  # V predicts R exactly
    assert a3c.explained_variance(torch.full((3,), 2.0), returns) == 0.0  # V is R's mean
    # R - V = [0, 0, 2]: Var = 8/9 against Var(R) = 8/3, so 1 - 1/3
    assert a3c.explained_variance(torch.tensor([0.0, 2.0, 2.0]), returns) == pytest.approx(2 / 3)
    assert a3c.explained_variance(torch.tensor([4.0, 2.0, 0.0]), returns) == pytest.approx(-3.0)  # worse than the mean
    assert math.isnan(a3c.explained_variance(torch.zeros(2), torch.ones(2)))  # returns that do not vary


def test_the_progress_line_averages_the_finite_update_statistics(capsys):
    monitor = a3c.Monitor(a3c.parse_args(["--log-interval", "1000"]))
    update = {"policy_loss": 1.0, "value_loss": 2.0, "entropy": 0.5, "explained_variance": 0.2, "grad_norm": 3.0}
    monitor.add_update(update)
    monitor.add_update({**update, "policy_loss": 3.0, "explained_variance": float("nan")})
    monitor.add_update({**update, "grad_norm": 6.0, "entropy": 1.25})
    monitor.progress(0, force=True)
    # the entropy's mean, 0.75, and the explained variance's, 0.2: the nan is left out, not averaged in
    assert " entropy=0.750 explained_variance=0.20" in capsys.readouterr().out
    assert monitor.updates == {name: [] for name in a3c.UPDATE_TAGS}  # the next line starts afresh


TENSORBOARD_SCALARS = {"episode/return", "episode/length", "update/policy_loss", "update/value_loss",
                       "update/entropy", "update/explained_variance", "update/grad_norm", "update/learning_rate",
                       "speed/steps_per_second"}


@pytest.mark.parametrize("mode", ["gradient", "data"])
def test_tensorboard_event_files_hold_every_scalar(mode, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = tmp_path / "runs"
    assert a3c.main(["--workers", "2", "--mode", mode, "--max-steps", "20000", "--log-interval", "0.2",
                     "--tensorboard", str(logdir), "--save", str(tmp_path / "model.pth")]) == 0
    assert SPAWN.active_children() == [] and multiprocessing.active_children() == []
    lines = capsys.readouterr().out.splitlines()
    assert any(re.search(r" entropy=[\d.]+ explained_variance=(-?[\d.]+|nan)", line) for line in lines), lines
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = TENSORBOARD_SCALARS | ({"data_mode/policy_lag"} if mode == "data" else set())
    assert expected <= set(events.Tags()["scalars"])
    for tag in expected:
        values = [event.value for event in events.Scalars(tag)]
        assert values and all(np.isfinite(values)), tag
    assert len(events.Scalars("update/entropy")) >= 2  # one point per --log-interval, not one per run
    episodes = events.Scalars("episode/return")
    assert len(episodes) >= 10 and [e.step for e in episodes] == sorted(e.step for e in episodes)
    assert "flags/text_summary" in events.Tags()["tensors"]


def test_tensorboard_missing_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    assert a3c.main(["--tensorboard", str(tmp_path / "runs"), "--save", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorboard" in err, err
    assert not (tmp_path / "m.pth").exists()


def test_tensorboard_unwritable_dir_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert a3c.main(["--tensorboard", str(tmp_path / "a_file" / "runs"), "--save", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard" in err and "cannot create it" in err, err


# --- operating it: bad input, checkpoints, signals, crashes -------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers: 0 must be in [1, 256]"),
    (["--lr", "fast"], "--lr: 'fast' is not a number"),
    (["--lr", "-0.001"], "--lr: -0.001 must be in (0, 1]"),
    (["--seed", "-1"], "--seed: -1 must be in [0, 4,294,967,295]"),
    (["--seed", "4294967296"], "--seed: 4294967296 must be in [0, 4,294,967,295]"),
    (["--seed", "1.5"], "--seed: '1.5' is not an integer"),
    (["--n-steps", "2.5"], "--n-steps: '2.5' is not an integer"),
    (["--gamma", "1.01"], "--gamma: 1.01 must be in (0, 1]"),
    (["--gamma", "0"], "--gamma: 0 must be in (0, 1]"),
    (["--entropy-coef", "nan"], "--entropy-coef: nan is not a finite number"),
    (["--max-grad-norm", "inf"], "--max-grad-norm: inf is not a finite number"),
    (["--mode", "both"], "--mode: invalid choice"),
])
def test_bad_flag_is_one_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        a3c.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("flags, message", [
    (["--env", "CartPol-v1"], "Did you mean: `CartPole`"),
    (["--env", "MatrixAction-v0"], "is neither Discrete nor a 1-D Box"),
    (["--env", "UnboundedAction-v0", "--target-return", "0"], "has infinite bounds"),
    (["--eval", "discrete_pendulum.pth"], "does not fit Pendulum-v1's observation and action spaces"),
    (["--eval", "missing.pth"], "no such file"),
    (["--resume", "not_a_checkpoint.pth"], "not readable as an a3c.py checkpoint"),
    (["--save", "no/such/folder/model.pth"], "cannot write in"),
    (["--eval", "cartpole.pth", "--env", "Acrobot-v1"], "has --env CartPole-v1, not Acrobot-v1"),
    (["--resume", "cartpole.pth", "--hidden", "32"], "has --hidden 16, not 32"),
    (["--video", "videos"], "--video records --eval episodes"),
    (["--eval", "cartpole.pth", "--video", "videos", "--render"], "--video and --render exclude each other"),
    (["--eval", "box.pth", "--video", "videos"], "RecordingBox-v0 cannot render its screen as an image"),
    (["--eval", "cartpole.pth", "--video", "cartpole.pth/videos"], "--video cartpole.pth/videos: cannot create it"),
    (["--env", "ALE/Pong-v5", "--target-return", "18", "--normalize-obs"], "observations are frames"),
    (["--resume", "cartpole.pth", "--separate-critic"], "was trained without --separate-critic"),
    (["--eval", "cartpole.pth", "--lstm"], "was trained without --lstm"),
    (["--lstm", "--separate-critic"], "--lstm and --separate-critic exclude each other"),
    (["--frame-stack", "1"], "--frame-stack: CartPole-v1's observations are vectors, not frames"),
    (["--eval", "pong.pth", "--frame-stack", "1"], "checkpoint pong.pth has --frame-stack 4, not 1"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_a_checkpoint.pth").write_bytes(b"this is not a checkpoint")
    save_small_checkpoint(tmp_path / "cartpole.pth")
    save_small_checkpoint(tmp_path / "discrete_pendulum.pth", env="Pendulum-v1", model=a3c.ActorCritic(3, 1, 16))
    save_small_checkpoint(tmp_path / "box.pth", env="RecordingBox-v0", model=a3c.ActorCritic(2, 2, 16, continuous=True))
    save_small_checkpoint(tmp_path / "pong.pth", env="ALE/Pong-v5", model=a3c.ActorCritic((4, 105, 80), 6, 16))
    assert a3c.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("a3c.py: error: ") and message in err, err


def test_too_little_shared_memory_for_data_mode_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The Pong command's rollout buffers (2 workers x 2 buffers of 8 envs x 5 steps of 4 x 105 x 80 frames, twice)
    need about 11 MB; a 4 MB /dev/shm, faked here, is refused before any process starts."""
    monkeypatch.setattr(a3c, "shared_memory_free", lambda: 4 << 20)
    flags = ["--env", "ALE/Pong-v5", "--workers", "2", "--envs-per-worker", "8", "--n-steps", "5",
             "--target-return", "18", "--save", str(tmp_path / "m.pth")]
    assert a3c.main([*flags, "--mode", "data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    needed, free = (float(x) for x in re.search(r"need ([\d.]+) MiB .* has ([\d.]+) MiB free", err).groups())
    assert 10 < needed < 12 and free == 4.0
    assert multiprocessing.active_children() == [] and not (tmp_path / "m.pth").exists()
    # gradient mode allocates no rollout buffers in shared memory: the same check lets it through
    monkeypatch.setattr(a3c, "shared_memory_free", lambda: 1 << 20)
    assert a3c.main(["--workers", "1", "--max-steps", "200", "--hidden", "16", "--target-return", "1e9",
                     "--save", str(tmp_path / "m.pth")]) == 0


def a_value_past(number, bound):
    """A value just past a Number's bound (at it, where the bound is open), as text."""
    if number.kind is int:
        return str(bound - 1 if bound == number.low else bound + 1)
    if bound == number.low and number.low_open:
        return str(bound)
    return str(bound + (-1 if bound == number.low else 1) * max(abs(bound), 1) * 0.01)


def test_every_numeric_flag_is_refused_at_and_past_its_bounds(tmp_path, capsys):
    """Every numeric flag has a range, read off the parser, so that a flag added later cannot be forgotten: at an
    open bound, past either bound, nan or infinity, each exits 2 in one line naming the flag before anything starts;
    the file at --save is unchanged and no process is left. At a closed bound it is accepted."""
    actions = [a for a in a3c.make_parser()._actions if a.option_strings and a.dest != "help"]
    assert all(isinstance(a.type, a3c.Number) or a.type in (None, str) for a in actions)  # no unbounded number
    numbers = [a for a in actions if isinstance(a.type, a3c.Number)]
    assert len(numbers) >= 21 and all(math.isfinite(a.type.low) and math.isfinite(a.type.high) for a in numbers)
    path = tmp_path / "model.pth"
    save_small_checkpoint(path)
    before = path.read_bytes()
    for action in numbers:
        flag, number = action.option_strings[0], action.type
        bad = [a_value_past(number, number.low), a_value_past(number, number.high), "1e30", "-1e30"]
        bad += ["1.5"] if number.kind is int else ["nan", "inf", "-inf"]
        for value in bad:
            with pytest.raises(SystemExit) as exit_info:
                a3c.main([f"{flag}={value}", "--save", str(path)])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.count("\n") == 1, (flag, value, err)
            assert f"argument {flag}: " in err, (flag, value, err)
        for bound in [number.high] + ([] if number.low_open else [number.low]):
            assert getattr(a3c.parse_args([f"{flag}={bound}"]), action.dest) == bound
    assert path.read_bytes() == before and multiprocessing.active_children() == []


def test_a_bad_seed_is_refused_before_any_process_starts_and_leaves_the_checkpoint(tmp_path):
    path = tmp_path / "a3c_model.pth"
    save_small_checkpoint(path)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, A3C, "--seed", "-1", "--save", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert "--seed: -1 must be in [0," in proc.stderr and path.read_bytes() == before


def other_than(action, value):
    """A value the parser accepts for a flag that takes one, other than value."""
    if action.choices:
        candidates = list(action.choices)
    elif isinstance(action.type, a3c.Number):
        number = action.type
        candidates = [number.high, number.low + 1 if number.kind is int else (number.low + number.high) / 2]
    else:
        candidates = [f"given-{action.dest}", "given-again"]
    return next(candidate for candidate in candidates if candidate != value)


def test_a_resumed_run_takes_every_training_flag_from_its_checkpoint_and_a_given_flag_wins(tmp_path):
    """Every flag the parser has, but what a command does (RUN_FLAGS) and --frame-stack (the model's input
    decides it), comes back from the checkpoint's args as the default; --save defaults to the checkpoint; a flag
    given again wins. One line says which came from where."""
    path = str(tmp_path / "run.pth")
    save_small_checkpoint(path, steps=1234)
    checkpoint = a3c.load_checkpoint(path)
    actions = {a.dest: a for a in a3c.make_parser()._actions if a.option_strings and a.dest != "help"}
    training = [name for name in actions if name not in (*a3c.RUN_FLAGS, "frame_stack")]
    assert len(training) == 28
    saved = {name: True if actions[name].type is None and not actions[name].choices  # store_true
             else other_than(actions[name], actions[name].default) for name in training}
    checkpoint["args"] = {**checkpoint["args"], **saved,
                          "save": "elsewhere.pth", "episodes": 77}
    args, line = a3c.resume_flags(["--resume", path], path, checkpoint)
    for name in training:
        assert getattr(args, name) == checkpoint["args"][name], name
    assert args.save == path and args.episodes == 10 and args.frame_stack is None
    assert "\n" not in line and line.startswith(f"a3c.py: resuming {path} at step 1234; from the checkpoint: ")
    assert "--lr 1.0" in line and "--mode data" in line and line.endswith("given: none"), line
    for name in training:  # given again, the command line's value wins
        action = actions[name]
        if action.type is None and not action.choices:
            continue  # store_true: it cannot be given as off (and a model flag cannot be dropped: prepare() refuses)
        value = other_than(action, checkpoint["args"][name])
        args, line = a3c.resume_flags(["--resume", path, f"{action.option_strings[0]}={value}"], path, checkpoint)
        assert getattr(args, name) == value != checkpoint["args"][name], name
        assert line.endswith(f"given: {action.option_strings[0]} {getattr(args, name)}"), (name, line)
    args, line = a3c.resume_flags(["--resume", path, "--save", "new.pth"], path, checkpoint)
    assert args.save == "new.pth"


def test_resuming_a_run_continues_it_where_it_was_saved(tmp_path, monkeypatch, capsys):
    """The README's Pong case on CartPole: a run with non-default flags, resumed with only a larger budget, goes on
    with its flags, its CSV and its checkpoint, and writes no a3c_model.pth."""
    monkeypatch.chdir(tmp_path)
    flags = ["--workers", "1", "--hidden", "16", "--lr", "0.0005", "--n-steps", "5", "--envs-per-worker", "2",
             "--max-grad-norm", "0.5", "--reward-scale", "1", "--target-return", "1e9", "--log-csv", "run.csv"]
    assert a3c.main([*flags, "--max-steps", "3000", "--save", "run.pth"]) == 0
    first = a3c.load_checkpoint("run.pth")
    rows = len(open("run.csv").readlines())
    capsys.readouterr()
    assert a3c.main(["--resume", "run.pth", "--max-steps", "6000"]) == 0
    out = capsys.readouterr().out
    assert "from the checkpoint: --workers 1 --env CartPole-v1 --lr 0.0005 --n-steps 5 --envs-per-worker 2" in out
    assert "given: --max-steps 6000" in out
    second = a3c.load_checkpoint("run.pth")
    assert not os.path.exists("a3c_model.pth") and second["steps"] >= 6000 > first["steps"]
    for name, value in first["args"].items():
        assert second["args"][name] == value or name in ("max_steps", "resume"), name
    assert len(open("run.csv").readlines()) > rows


def test_a_checkpoint_whose_flags_are_out_of_range_is_refused_in_one_line(tmp_path, capsys):
    """The run of `--seed -1` that an older a3c.py started, crashed and saved: resumed, its seed is checked as a
    typed one is."""
    path = str(tmp_path / "run.pth")
    save_small_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"]["seed"] = -1
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit) as exit_info:
        a3c.main(["--resume", path])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--seed: -1 must be in [0," in err, err


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "5000"], "has taken 5000 steps, --max-steps 5000: give a larger --max-steps"),
    (["--max-episodes", "100"], "has played 100 episodes, --max-episodes 100: give a larger one"),
    (["--target-return", "400"], "has reached --target-return 400.0 already: give a higher one"),
])
def test_resuming_a_run_that_would_stop_at_once_is_refused(flags, message, tmp_path, capsys):
    path = str(tmp_path / "run.pth")
    model = a3c.ActorCritic(4, 2, 16)
    args = a3c.parse_args(["--hidden", "16"])
    a3c.prepare(args)
    a3c.save_checkpoint(path, model, torch.optim.Adam(model.parameters()), args, 5000, 100, [450.0] * 100)
    assert a3c.main(["--resume", path, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


class StuckAtResetCartPole(CartPoleEnv):
    """CartPole whose reset never returns: a run stopped before its first update, whatever the machine's speed."""

    def reset(self, *, seed=None, options=None):
        threading.Event().wait()


class BrokenAtResetCartPole(CartPoleEnv):
    def reset(self, *, seed=None, options=None):
        raise RuntimeError("the environment broke at once")


gym.register("StuckAtResetCartPole-v0", entry_point=StuckAtResetCartPole, max_episode_steps=500, reward_threshold=475.0)
gym.register("BrokenAtResetCartPole-v0", entry_point=BrokenAtResetCartPole, max_episode_steps=500,
             reward_threshold=475.0)


@pytest.mark.parametrize("mode", ["gradient", "data"])
def test_a_worker_failing_at_start_up_leaves_the_checkpoint_as_it_was(mode, tmp_path, capfd):
    path = tmp_path / "model.pth"
    save_small_checkpoint(path)
    before = path.read_bytes()
    code = a3c.main(["--env", "test_a3c:BrokenAtResetCartPole-v0", "--workers", "2", "--mode", mode, "--save",
                     str(path)])
    err = capfd.readouterr().err
    assert code == 1 and "the environment broke at once" in err
    assert f"no update was made, so {path} was left as it was" in err
    assert path.read_bytes() == before and multiprocessing.active_children() == []


def test_ctrl_c_before_the_first_update_leaves_the_checkpoint_as_it_was(tmp_path):
    path = tmp_path / "model.pth"
    save_small_checkpoint(path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, A3C, "--env", "test_a3c:StuckAtResetCartPole-v0", "--workers", "2",
                             "--log-interval", "0.1", "--save", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=HERE)
    try:
        assert proc.stdout.readline().startswith("episodes=0 steps=0 ")  # training has started, nothing learned
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.count("\n") == 1, err
    assert f"stopped by SIGINT; no update was made, so {path} was left as it was" in err
    assert path.read_bytes() == before and group_is_empty(proc.pid, 5)


def test_cli_bad_input_prints_no_traceback():
    proc = subprocess.run([sys.executable, A3C, "--env", "NoSuchEnv-v0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "NoSuchEnv" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    save_small_checkpoint(path)
    before = path.read_bytes()

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_small_checkpoint(path, steps=5)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.pth"]


def no_space(*args, **kwargs):
    """What a write to a full disk raises."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_write_failure(obj, f):
    """What torch.save raises when the file's write fails (torch 2.x, seen writing to /dev/full): a RuntimeError of
    its own, raised while the OSError was being handled."""
    try:
        no_space()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("target, failure", [("torch.save", no_space), ("torch.save", torch_write_failure),
                                             ("open", no_space)], ids=["OSError", "RuntimeError-from-OSError", "open"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_the_old_file(target, failure, tmp_path,
                                                                                 monkeypatch):
    path = tmp_path / "model.pth"
    model = save_small_checkpoint(path)
    before = path.read_bytes()
    if target == "open":  # the .tmp file cannot even be created
        monkeypatch.setattr(a3c, "open", failure, raising=False)
    else:
        monkeypatch.setattr(a3c.torch, "save", failure)
    with pytest.raises(a3c.CheckpointError) as error:
        a3c.save_checkpoint(str(path), model, torch.optim.Adam(model.parameters()), a3c.parse_args([]), 5, 1, [])
    assert str(error.value) == f"cannot write checkpoint {path}: {os.strerror(errno.ENOSPC)}"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.pth"]  # no .tmp left behind


TRAIN_BRIEFLY = ["--workers", "1", "--hidden", "16", "--max-steps", "2000", "--target-return", "1e9"]
RESULT_LINE = r"result: solved=no episodes=\d+ steps=(\d+) seconds=[\d.]+ steps_per_second=\d+ mean_return=[\d.]+"


def test_a_periodic_checkpoint_that_cannot_be_written_is_one_line_and_training_goes_on(tmp_path, monkeypatch,
                                                                                        capsys):
    """The first save fails (a full disk, say), later ones succeed: one line on stderr, training goes on, the
    run ends well and its checkpoint is written. --save-every 1e-9: a save at every turn of the loop, so the
    first one is a periodic one."""
    path, saves, save = tmp_path / "model.pth", [], torch.save

    def first_fails(obj, f):
        saves.append(obj["steps"])
        if len(saves) == 1:
            no_space()
        save(obj, f)

    monkeypatch.setattr(a3c.torch, "save", first_fails)
    assert a3c.main([*TRAIN_BRIEFLY, "--save-every", "1e-9", "--save", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == f"a3c.py: cannot write checkpoint {path}: {os.strerror(errno.ENOSPC)}; training goes on\n", err
    steps = int(re.fullmatch(RESULT_LINE, out.splitlines()[-1]).group(1))
    assert len(saves) >= 2 and a3c.load_checkpoint(str(path))["steps"] == saves[-1] == steps >= 2000
    assert os.listdir(tmp_path) == ["model.pth"]


def test_a_final_checkpoint_that_cannot_be_written_is_one_line_exit_1_and_still_the_result_line(tmp_path,
                                                                                                monkeypatch, capsys):
    """Every save fails: each periodic one is a line and training goes on; the final one is a line, and the
    run's exit code 1; main still prints the result line."""
    path = tmp_path / "model.pth"
    monkeypatch.setattr(a3c.torch, "save", no_space)
    assert a3c.main([*TRAIN_BRIEFLY, "--save-every", "1e-9", "--save", str(path)]) == 1
    out, err = capsys.readouterr()
    *periodic, final = err.splitlines()
    line = f"a3c.py: cannot write checkpoint {path}: {os.strerror(errno.ENOSPC)}"
    assert final == line and periodic and all(p == line + "; training goes on" for p in periodic), err
    assert "Traceback" not in err and re.fullmatch(RESULT_LINE, out.splitlines()[-1]), out
    assert os.listdir(tmp_path) == []


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    path = tmp_path / "model.pth"
    model = save_small_checkpoint(path)
    with torch.no_grad():
        model.policy.out.weight[0, 0] = float("nan")
    args = a3c.parse_args([])
    assert not a3c.save_checkpoint(str(path), model, torch.optim.Adam(model.parameters()), args, 1, 1, [])
    assert torch.isfinite(a3c.load_checkpoint(str(path))["model"]["policy.out.weight"]).all()


@pytest.mark.parametrize("version", ["v2", "v3", "v4"])
def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(version, tmp_path, capsys):
    path = tmp_path / f"{version}.pth"
    save_small_checkpoint(path)
    assert a3c.main(["--eval", str(path), "--episodes", "1"]) == 0  # as written today (v5): plays
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["format"] = f"a3c.py checkpoint {version}"
    torch.save(checkpoint, path)
    capsys.readouterr()
    assert a3c.main(["--eval", str(path), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"format {version}, and this a3c.py builds and reads v5 only" in err


def test_an_lstm_checkpoint_plays_and_resumes_as_the_network_it_saved(tmp_path, capsys):
    """A checkpoint with an LSTM (the format written today): loaded, it is the same function as the model that
    was saved, and both --eval and --resume take it."""
    path = tmp_path / "lstm.pth"
    model = a3c.ActorCritic(4, 2, 16, lstm=True)
    with torch.no_grad():
        model.core.input_weights.bias.normal_()
    save_small_checkpoint(path, model=model)
    loaded = a3c.load_checkpoint(str(path))
    assert loaded["lstm"] and loaded["format"] == a3c.CHECKPOINT_FORMAT
    restored = a3c.ActorCritic(4, 2, 16, lstm=True)
    restored.load_state_dict(loaded["model"])  # strict: every parameter of today's network, nothing else
    obs, core_state = torch.randn(3, 4), torch.randn(3, 32)
    with torch.no_grad():
        for got, expected in zip(restored(obs, core_state), model(obs, core_state)):
            torch.testing.assert_close(got, expected)
    capsys.readouterr()
    assert a3c.main(["--eval", str(path), "--episodes", "1"]) == 0
    assert "result: solved=" in capsys.readouterr().out
    resumed = tmp_path / "resumed.pth"
    assert a3c.main(["--resume", str(path), "--workers", "1", "--max-steps", "200", "--save", str(resumed)]) == 0
    assert a3c.load_checkpoint(str(resumed))["lstm"]


def test_a_non_finite_loss_is_raised_before_it_reaches_the_weights():
    batch = fixed_rollout()
    a3c.rollout_loss(small_model("categorical"), batch, 0.99, 0.5, 0.01)
    batch[0][0].rewards[2, 0] = math.nan
    with pytest.raises(FloatingPointError, match="training diverged"):
        a3c.rollout_loss(small_model("categorical"), batch, 0.99, 0.5, 0.01)


def test_resume_then_eval_round_trip(tmp_path, capsys):
    path = str(tmp_path / "model.pth")
    common = ["--workers", "1", "--hidden", "16", "--save", path]
    assert a3c.main([*common, "--max-steps", "3000"]) == 0
    first = a3c.load_checkpoint(path)
    assert a3c.main(["--resume", path, "--workers", "1", "--max-steps", "6000", "--save", path, "--mode", "data"]) == 0
    second = a3c.load_checkpoint(path)
    assert first["steps"] >= 3000 and second["steps"] >= 6000 and second["episodes"] > first["episodes"]
    assert second["hidden"] == 16 and second["env"] == "CartPole-v1"
    capsys.readouterr()
    assert a3c.main(["--eval", path, "--episodes", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("episode ")]) == 3
    assert re.fullmatch(r"result: solved=no episodes=3 steps=\d+ seconds=[\d.]+ steps_per_second=\d+ "
                        r"mean_return=[\d.]+", out[-1]), out[-1]


def test_a_resumed_run_goes_on_with_its_learning_rate_schedule(tmp_path):
    path, lr = str(tmp_path / "model.pth"), 2e-3  # data mode: the learner sets the rate in the main process
    common = ["--workers", "1", "--hidden", "16", "--mode", "data", "--max-steps", "8000", "--save", path]
    assert a3c.main([*common, "--lr-schedule", "linear", "--max-episodes", "30"]) == 0
    first = a3c.load_checkpoint(path)
    assert a3c.main([*common, "--resume", path, "--max-episodes", "40"]) == 0  # no --lr-schedule: the checkpoint's
    second = a3c.load_checkpoint(path)
    assert second["args"]["lr_schedule"] == "linear" and second["steps"] < 2 * first["steps"]
    # the last update's rate: decayed over the whole run's steps, not from where the second run began
    rate = second["optimizer"]["param_groups"][0]["lr"]
    assert lr * (1 - second["steps"] / 8000) <= rate <= lr * (1 - first["steps"] / 8000)


def test_runs_of_different_seeds_share_no_stream():
    """Seeds 1-5 with 2 workers of 4 envs: every worker's and env's seed differs from every other's, within a run
    and across runs (seed + rank + k * workers shared most of them); the same seed gives the same ones; a resumed
    run gets new ones."""
    runs = {seed: a3c.run_seeds(seed, 0, 2, 4) for seed in range(1, 6)}
    assert all(len(run) == 2 and all(len(worker) == 1 + 4 for worker in run) for run in runs.values())
    every = [s for run in runs.values() for worker in run for s in worker]
    assert len(set(every)) == len(every) == 5 * 2 * 5
    assert a3c.run_seeds(1, 0, 2, 4) == runs[1]
    resumed = [s for worker in a3c.run_seeds(1, 40000, 2, 4) for s in worker]
    assert not set(resumed) & set(every)


def test_one_worker_is_reproducible_run_to_run(tmp_path):
    """--workers 1 --mode gradient: the same seed gives the same episodes, and updates to the same weights; another
    seed does not. A run's last episodes and updates depend on when the stop reaches the worker, so the CLI runs are
    compared over the episodes both logged, and the weights after a fixed number of updates of the worker itself."""
    def logged_episodes(seed, name):
        csv_path = tmp_path / f"{name}.csv"
        assert a3c.main(["--workers", "1", "--seed", str(seed), "--max-steps", "4000", "--hidden", "16",
                         "--save", str(tmp_path / f"{name}.pth"), "--log-csv", str(csv_path)]) == 0
        return [row[2:] for row in csv.reader(open(csv_path))]  # worker, return, length; not the times
    rows, again, other = logged_episodes(1, "a"), logged_episodes(1, "b"), logged_episodes(2, "c")
    n = min(len(rows), len(again))
    assert n > 100 and rows[:n] == again[:n] and rows[:n] != other[:n]

    def fifty_updates(seed):
        args = a3c.parse_args(["--workers", "1", "--seed", str(seed), "--hidden", "16"])
        a3c.prepare(args)
        torch.manual_seed(args.seed)  # as train() builds the shared model
        shared_model = a3c.new_model(a3c.env_spaces(a3c.make_env(args.env)), args)
        shared_model.share_memory()
        optimizer = a3c.SharedAdam(shared_model.parameters(), lr=args.lr)
        steps = a3c.StepCounter(multiprocessing.get_context("fork"), 1)
        seeds = a3c.run_seeds(args.seed, 0, 1, args.envs_per_worker)[0]
        worker = a3c.gradient_worker(0, args, seeds, shared_model, optimizer, steps)
        episodes = [episode for _ in range(50) for episode in next(worker)[1][1]]
        return episodes, [p.detach().clone() for p in shared_model.parameters()]
    (episodes, weights), (episodes_again, weights_again), (other, _) = [fifty_updates(s) for s in (1, 1, 2)]
    assert len(episodes) > 20 and episodes == episodes_again and episodes != other
    assert all(torch.equal(w, v) for w, v in zip(weights, weights_again))


def test_episode_csv_has_one_row_per_episode(tmp_path):
    csv_path = tmp_path / "episodes.csv"
    args = a3c.parse_args(["--workers", "1", "--max-episodes", "20", "--hidden", "16", "--log-csv", str(csv_path),
                           "--save", str(tmp_path / "model.pth")])
    a3c.prepare(args)
    summary = a3c.train(args)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "wall_time,steps,worker,return,length"
    assert len(rows) - 1 == summary["episodes"] >= 20
    returns = [float(row.split(",")[3]) for row in rows[1:]]
    lengths = [int(row.split(",")[4]) for row in rows[1:]]
    assert returns == lengths  # CartPole pays 1 per step: the true undiscounted return is the length


def group_is_empty(pgid, seconds):
    """True once no process of the group is left, polling for up to `seconds`."""
    for _ in range(int(seconds * 10)):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def worker_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(child) for child in f.read().split()]
    return [child for child in children if "resource_tracker" not in open(f"/proc/{child}/cmdline").read()]


@pytest.fixture
def training(tmp_path):
    """Start a3c.py in a session of its own, as a terminal would, and wait until it has made an update."""
    started = []

    def start(*flags):
        proc = subprocess.Popen([sys.executable, A3C, "--workers", "2", "--hidden", "16", "--target-return", "1e9",
                                 "--log-interval", "0.2", "--save", str(tmp_path / "model.pth"), *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                cwd=HERE)
        started.append(proc)
        watchdog = threading.Timer(90, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        for line in proc.stdout:  # a progress line comes every 0.2 s; with an entropy once the run has learned
            if " entropy=" in line:
                break
        watchdog.cancel()
        assert proc.poll() is None, proc.stderr.read()
        return proc

    yield start
    for proc in started:  # whatever happened in the test, leave nothing behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.parametrize("signum, to_group, mode", [
    (signal.SIGINT, True, "gradient"),  # Ctrl-C in a terminal: the whole process group gets it
    (signal.SIGINT, False, "data"),
    (signal.SIGTERM, False, "data"),
    (signal.SIGTERM, True, "gradient"),
])
def test_signal_stops_everything_and_saves(training, tmp_path, signum, to_group, mode):
    proc = training("--mode", mode)
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"stopped by {signal.Signals(signum).name}; checkpoint saved to" in err
    assert out.splitlines()[-1].startswith("result: solved=no")
    assert a3c.load_checkpoint(str(tmp_path / "model.pth"))["steps"] > 0
    assert group_is_empty(proc.pid, 5)


def test_a_signal_while_training_is_acted_on_by_the_loop_not_where_it_lands():
    """The handler only notes the signal: raising there would raise wherever the main process is, for example
    halfway through reading a message from the pipe, which then breaks the queue for the clean-up."""
    with a3c.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundaries: nothing may be raised here
            pass
        assert signals.received == signal.SIGTERM
        with pytest.raises(a3c.Stop) as stop:
            signals.raise_if_received()
    assert stop.value.exit_code == 143 and str(stop.value) == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the previous handler is back


@pytest.mark.parametrize("flags", [
    (),
    # frames: the rollouts stay in shared memory and only a few hundred bytes cross the pipe per update
    ("--mode", "data", "--env", "ALE/Pong-v5", "--envs-per-worker", "4", "--n-steps", "5"),
])
def test_killed_worker_stops_the_run(training, tmp_path, flags):
    proc = training(*flags)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and re.search(r"worker \d was killed by SIGKILL", err) and "Traceback" not in err
    assert os.path.exists(tmp_path / "model.pth")
    assert group_is_empty(proc.pid, 5)


class BrokenCartPole(CartPoleEnv):
    """CartPole that raises after 300 steps: a stand-in for a bug in a user's environment."""

    def step(self, action):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken > 300:
            raise RuntimeError("the environment broke")
        return super().step(action)


# a3c.py can make it by the id "test_a3c:BrokenCartPole-v0": Gymnasium imports this module, which registers it
gym.register("BrokenCartPole-v0", entry_point=BrokenCartPole, max_episode_steps=500, reward_threshold=475.0)


def test_failing_worker_reports_its_traceback(training, tmp_path):
    proc = training("--mode", "data", "--env", "test_a3c:BrokenCartPole-v0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "RuntimeError: the environment broke" in err and "Traceback" in err
    assert re.search(r"worker \d failed with exit code 1", err)
    assert group_is_empty(proc.pid, 5)


def test_workers_exit_when_main_is_killed(training):
    proc = training()
    workers = worker_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2 and group_is_empty(proc.pid, 10)


class InfiniteRewardCartPole(CartPoleEnv):
    """CartPole whose reward turns infinite after 2,000 steps, once the run has learned: a diverging loss."""

    def step(self, action):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, math.inf if self.steps_taken > 2000 else reward, terminated, truncated, info


gym.register("InfiniteRewardCartPole-v0", entry_point=InfiniteRewardCartPole, max_episode_steps=500,
             reward_threshold=475.0)


def test_diverged_training_keeps_last_good_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    save_small_checkpoint(path)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, A3C, "--workers", "2", "--env", "test_a3c:InfiniteRewardCartPole-v0",
                           "--hidden", "16", "--save", str(path), "--max-steps", "1000000"],
                          capture_output=True, text=True, timeout=120, cwd=HERE)
    assert proc.returncode == 1
    assert "training diverged" in proc.stderr and "keeps the last good checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == before
