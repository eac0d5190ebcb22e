"""Tests for a3c.py: the maths first (returns, losses, optimizer), then processes, then learning."""
import copy
import multiprocessing
import os
import queue
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import a3c

HERE = os.path.dirname(os.path.abspath(__file__))
SPAWN = multiprocessing.get_context("spawn")


# --- n-step returns ----------------------------------------------------------------------------------

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


# --- rollouts and the bootstrap rule ----------------------------------------------------------------

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


def run_rollouts(envs, n_steps):
    envs = [gym.wrappers.RecordEpisodeStatistics(env) for env in envs]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    model = a3c.ActorCritic(2, 2, hidden=8)
    return a3c.collect_rollouts(envs, model, obs, n_steps, np.random.default_rng(0)), obs


def test_rollout_truncated_keeps_final_obs_not_reset_obs():
    (ended, cut), obs = run_rollouts([CountingEnv(end_at=3, truncate=True)], n_steps=5)
    assert len(ended.rewards) == 3 and ended.truncated and not ended.terminated
    np.testing.assert_array_equal(ended.final_obs, [3.0, 0.0])  # s_T, to bootstrap from
    np.testing.assert_array_equal(ended.obs[:, 0], [-1.0, 1.0, 2.0])
    assert ended.episode == (3.0, 3)  # the true undiscounted return and length
    # the next piece starts from the reset observation and is cut by n_steps after 2 steps
    np.testing.assert_array_equal(cut.obs[:, 0], [-1.0, 1.0])
    assert not cut.terminated and not cut.truncated and cut.episode is None
    np.testing.assert_array_equal(cut.final_obs, [2.0, 0.0])
    np.testing.assert_array_equal(obs, [[2.0, 0.0]])  # where the next call carries on


def test_rollouts_of_several_envs_terminated_and_cut():
    rollouts, _ = run_rollouts([CountingEnv(end_at=3), CountingEnv(end_at=10)], n_steps=4)
    assert [(len(r.rewards), r.terminated, r.truncated, r.episode) for r in rollouts] == [
        (3, True, False, (3.0, 3)),  # env 0: an episode ends at step 3 ...
        (1, False, False, None),  # ... env 0: the next one is cut after 1 more step
        (4, False, False, None),  # env 1: cut after 4 steps, no episode ended
    ]
    np.testing.assert_array_equal(rollouts[2].final_obs, [4.0, 0.0])
    for r in rollouts:
        assert r.obs.dtype == np.float32 and r.actions.dtype == np.int64 and r.rewards.dtype == np.float32
        assert r.obs.shape == (len(r.rewards), 2) and r.final_obs.shape == (2,)


def test_sample_actions_follow_the_policy():
    """Gumbel-max sampling: frequencies match softmax(logits) (3-sigma bound on 20000 samples)."""
    model = a3c.ActorCritic(2, 3, hidden=8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.policy.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    actions = a3c.sample_actions(model, np.zeros((20000, 2), np.float32), np.random.default_rng(0))
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).numpy()
    frequencies = np.bincount(actions, minlength=3) / len(actions)
    assert np.all(np.abs(frequencies - expected) < 3 * np.sqrt(expected * (1 - expected) / len(actions)))


def make_rollout(first_obs, T, terminated=False, truncated=False, version=0):
    obs = np.stack([np.array([first_obs + t, 0.0], np.float32) for t in range(T)])
    return a3c.Rollout(obs, np.zeros(T, np.int64), np.ones(T, np.float32), np.array([first_obs + T, 0.0], np.float32),
                       terminated, truncated, None, version)


def value_is_first_coordinate(obs):
    """A stand-in model whose V(s) is s[0], so each bootstrap value names the observation it came from."""
    return torch.zeros(obs.shape[0], 2, requires_grad=True), obs[:, 0].clone().requires_grad_()


def test_batch_bootstraps_follow_termination_rule():
    terminated = make_rollout(10.0, 3, terminated=True)  # final obs [13, 0]
    truncated = make_rollout(20.0, 2, truncated=True)  # final obs [22, 0]
    cut = make_rollout(30.0, 4)  # final obs [34, 0]
    logits, values, actions, bootstraps = a3c.assemble_batch(value_is_first_coordinate, [terminated, truncated, cut])
    assert bootstraps == [0.0, 22.0, 34.0]
    # the rows kept are the states s_0 .. s_{T-1} of each rollout, in order: no bootstrap state among them
    torch.testing.assert_close(values.detach(), torch.tensor([10.0, 11.0, 12.0, 20.0, 21.0, 30.0, 31.0, 32.0, 33.0]))
    assert logits.shape == (9, 2) and actions.shape == (9,)


def test_rollout_loss_uses_bootstrap():
    """With zero logits and V = s[0], the loss is known in closed form: check the value part."""
    gamma = 0.5
    for rollout, bootstrap in [(make_rollout(4.0, 1, terminated=True), 0.0), (make_rollout(4.0, 1, truncated=True), 5.0)]:
        loss = a3c.rollout_loss(value_is_first_coordinate, [rollout], gamma, value_coef=1.0, entropy_coef=0.0)
        expected_return = 1.0 + gamma * bootstrap
        # zero logits: log pi = log 0.5; policy term = -log(0.5) * (R - V)
        expected = -np.log(0.5) * (expected_return - 4.0) + 0.5 * (expected_return - 4.0) ** 2
        assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- loss signs ---------------------------------------------------------------------------------------

def one_sgd_step(logits, values, actions, returns, value_coef=0.5, entropy_coef=0.0, lr=0.1):
    logits = logits.clone().requires_grad_()
    values = values.clone().requires_grad_()
    a3c.a3c_loss(logits, values, actions, returns, value_coef, entropy_coef).backward()
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
    loss = a3c.a3c_loss(torch.zeros(2, 2), returns.clone(), torch.tensor([0, 1]), returns, value_coef=1.0, entropy_coef=0.0)
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


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(AssertionError):
        a3c.a3c_loss(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.zeros(3), 0.5, 0.01)


# --- SharedAdam ---------------------------------------------------------------------------------------

def adam_pair(**kwargs):
    torch.manual_seed(0)
    model = a3c.ActorCritic(4, 2, hidden=16)
    twin = copy.deepcopy(model)
    return model, a3c.SharedAdam(model.parameters(), **kwargs), twin, torch.optim.Adam(twin.parameters(), **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"lr": 3e-3, "weight_decay": 0.1, "amsgrad": True}])
def test_shared_adam_equals_torch_adam(kwargs):
    model, shared_adam, twin, adam = adam_pair(**kwargs)
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


def test_shared_adam_state_is_in_shared_memory_from_the_start():
    model, shared_adam, _, _ = adam_pair()
    assert shared_adam.share_memory() is shared_adam
    for p in model.parameters():
        state = shared_adam.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(tensor.is_shared() for tensor in state.values())
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0


# --- gradient hand-over ------------------------------------------------------------------------------

def fixed_rollout():
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((5, 4)).astype(np.float32)
    return a3c.Rollout(obs, np.array([0, 1, 1, 0, 1]), np.ones(5, np.float32), obs[-1] + 0.1, False, True, None, 0)


def rollout_gradient(model, rollout):
    model = copy.deepcopy(model)
    model.zero_grad()
    a3c.rollout_loss(model, [rollout], 0.99, 0.5, 0.01).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_each_hogwild_update_applies_only_its_own_gradient():
    """The torch >= 2.0 port bug made the local gradients sum across updates (g, 2g, 3g, ...)."""
    torch.manual_seed(0)
    shared_model = a3c.ActorCritic(4, 2, hidden=16)
    local_model = copy.deepcopy(shared_model)
    optimizer = torch.optim.SGD(shared_model.parameters(), lr=0.0)  # lr 0: the same loss every time
    rollout = fixed_rollout()
    expected = rollout_gradient(local_model, rollout)
    for _ in range(3):
        loss = a3c.rollout_loss(local_model, [rollout], 0.99, 0.5, 0.01)
        a3c.hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm=float("inf"))
        for p, g in zip(shared_model.parameters(), expected):
            torch.testing.assert_close(p.grad, g)


def child_applies_gradient(shared_model, optimizer, rollout):
    torch.set_num_threads(1)
    local_model = copy.deepcopy(shared_model)
    a3c.sync_model(local_model, shared_model)
    loss = a3c.rollout_loss(local_model, [rollout], 0.99, 0.5, 0.01)
    a3c.hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm=float("inf"))


def test_gradient_from_spawned_child_updates_shared_model_as_adam_would():
    torch.manual_seed(0)
    shared_model = a3c.ActorCritic(4, 2, hidden=16)
    shared_model.share_memory()
    optimizer = a3c.SharedAdam(shared_model.parameters(), lr=1e-2)
    reference = copy.deepcopy(shared_model)
    reference_adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    rollout = fixed_rollout()
    for p, g in zip(reference.parameters(), rollout_gradient(reference, rollout)):
        p.grad = g
    reference_adam.step()

    for step in (1, 2):
        child = SPAWN.Process(target=child_applies_gradient, args=(shared_model, optimizer, rollout))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0
        for p in shared_model.parameters():
            assert optimizer.state[p]["step"].item() == step  # the child's step counter is the parent's
        if step == 1:
            for p, q in zip(shared_model.parameters(), reference.parameters()):
                torch.testing.assert_close(p, q)
            first = [p.detach().clone() for p in shared_model.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(shared_model.parameters(), first))


# --- data path ---------------------------------------------------------------------------------------

def test_data_worker_sends_rollouts_and_stops_when_told():
    args = a3c.parse_args(["--n-steps", "7", "--hidden", "16"])
    a3c.prepare(args)
    shared_model = a3c.ActorCritic(4, 2, 16)
    shared_model.share_memory()
    version, global_step, stop_event = SPAWN.Value("q", 3), SPAWN.Value("q", 0), SPAWN.Event()
    rollouts = SPAWN.Queue(maxsize=4)
    worker = SPAWN.Process(target=a3c.data_worker, daemon=True,
                           args=(0, args, shared_model, version, global_step, rollouts, stop_event, os.getpid()))
    worker.start()
    try:
        received = [rollouts.get(timeout=60) for _ in range(3)]
    finally:
        stop_event.set()
        a3c.stop_processes([worker], [rollouts])
    assert worker.exitcode == 0
    assert all(sum(len(r.rewards) for r in message) == 7 * args.envs_per_worker for message in received)
    for r in [r for message in received for r in message]:
        T = len(r.rewards)
        assert 1 <= T <= 7 and r.obs.shape == (T, 4) and r.actions.shape == (T,) and r.final_obs.shape == (4,)
        assert r.obs.dtype == np.float32 and r.actions.dtype == np.int64
        assert r.version == 3 and r.rank == 0 and (r.episode is None) == (not (r.terminated or r.truncated))
        assert set(r.actions.tolist()) <= {0, 1}
    assert global_step.value >= 3 * 7 * args.envs_per_worker


# --- whole runs --------------------------------------------------------------------------------------

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


def run_cli(*flags, timeout):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "a3c.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"result: solved=(yes|no) episodes=(\d+) steps=(\d+) seconds=([\d.]+) "
                         r"steps_per_second=(\d+) mean_return=([-\d.]+)", last)
    assert match, last
    return match


@pytest.mark.parametrize("mode", ["gradient", "data"])
def test_single_worker_learns_cartpole(mode, tmp_path):
    """One worker learns CartPole-v1 to a mean return of 195 over 100 episodes (the old CartPole-v0 bar).

    Reliable by construction: one worker in gradient mode is deterministic for a seed, and seed 1 gets
    there in well under the step budget in both modes; the budget is in env steps, not seconds, so a busy
    machine makes the test slower but not flaky. The timeout only guards against a hang.
    """
    match = run_cli("--workers", "1", "--mode", mode, "--seed", "1", "--target-return", "195",
                    "--max-steps", "150000", "--save", str(tmp_path / "model.pth"), timeout=150)
    assert match.group(1) == "yes", match.group(0)
