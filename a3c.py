"""Asynchronous Advantage Actor-Critic (A3C) in one file, for PyTorch and Gymnasium on the CPU.

Two ways to run the workers in parallel:
  --mode gradient  every worker acts, computes the gradient of its own rollout and applies it to the
                   shared model through a shared-state Adam, without locks (Hogwild, as in the paper).
  --mode data      workers only act and send their rollouts to one learner, the main process, which
                   batches them, computes the gradient and publishes the new weights.

    python a3c.py --workers 4 --mode gradient
    python a3c.py --workers 2 --mode data --seed 1

References: Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning", arXiv:1602.01783
(Algorithm S3); Recht et al. 2011, "Hogwild!", arXiv:1106.5730.
"""
import argparse
import math
import os
import queue
import signal
import sys
import time
import traceback
from collections import deque
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn as nn


# --- 1. Command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    """Parse the command line; tests call parse_args([...]) with their own flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--mode", choices=["gradient", "data"], default="gradient",
                   help="gradient: Hogwild workers; data: workers act, one learner trains")
    p.add_argument("--env", type=str, default="CartPole-v1", help="Gymnasium id (vector obs, discrete actions)")
    p.add_argument("--seed", type=int, default=0, help="worker i uses seed + i")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--gamma", type=float, default=0.99, help="discount factor, in (0, 1]")
    p.add_argument("--n-steps", type=int, default=20, help="longest rollout between two updates")
    p.add_argument("--entropy-coef", type=float, default=0.01, help="weight of the entropy bonus")
    p.add_argument("--value-coef", type=float, default=0.5, help="weight of the value loss")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="clip each update's gradient norm")
    p.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers")
    p.add_argument("--batch-rollouts", type=int, default=None,
                   help="data mode: rollouts per learner update (default: one per worker)")
    p.add_argument("--max-episodes", type=int, default=None, help="stop after this many episodes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many env steps")
    p.add_argument("--target-return", type=float, default=None,
                   help="stop when the mean return of the last 100 episodes reaches it "
                        "(default: the env's reward_threshold)")
    p.add_argument("--log-interval", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--save", type=str, default="a3c_model.pth", help="where to save the model at the end")
    return p.parse_args(argv)


# --- 2. Environment --------------------------------------------------------------------------------

def make_env(env_id, seed=None):
    """Build a Gymnasium env (5-tuple step) that reports each episode's true undiscounted return.

    The TimeLimit wrapper stays on: it is what tells a time-limit truncation from a real termination.
    RecordEpisodeStatistics puts the episode's return and length in info["episode"] when it ends.
    """
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(env_id))
    obs_space, action_space = env.observation_space, env.action_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        env.close()
        raise ValueError(f"{env_id}: observation space {obs_space} is not a 1-D Box")
    if not isinstance(action_space, gym.spaces.Discrete):
        env.close()
        raise ValueError(f"{env_id}: action space {action_space} is not Discrete")
    if seed is not None:
        env.action_space.seed(seed)
    return env


# --- 3. Network ------------------------------------------------------------------------------------

class ActorCritic(nn.Module):
    """A shared torso with a policy head (logits) and a value head V(s)."""

    def __init__(self, obs_size, n_actions, hidden=64):
        super().__init__()
        self.torso = nn.Sequential(nn.Linear(obs_size, hidden), nn.Tanh(),
                                   nn.Linear(hidden, hidden), nn.Tanh())
        self.policy = nn.Linear(hidden, n_actions)
        self.value = nn.Linear(hidden, 1)
        # Orthogonal init; a tiny policy head starts the policy near uniform (maximal exploration),
        # a unit-scale value head lets V(s) reach the scale of the returns quickly.
        for layer, gain in [(self.torso[0], math.sqrt(2)), (self.torso[2], math.sqrt(2)),
                            (self.policy, 0.01), (self.value, 1.0)]:
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)

    def forward(self, obs):
        """obs [B, obs_size] float32 -> (logits [B, n_actions], value [B])."""
        h = self.torso(obs)
        return self.policy(h), self.value(h).squeeze(-1)


def sample_action(model, obs, rng):
    """Sample a ~ pi(.|obs) without building an autograd graph.

    Gumbel-max trick: argmax(logits + Gumbel noise) is an exact sample from softmax(logits), and on a
    batch of one it costs far less than torch.distributions.Categorical or torch.multinomial.
    """
    with torch.inference_mode():
        logits, _ = model(torch.from_numpy(obs).unsqueeze(0))
    logits = logits[0].numpy()
    return int(np.argmax(logits + rng.gumbel(size=logits.shape)))


# --- 4. Shared optimizer ---------------------------------------------------------------------------

class SharedAdam(torch.optim.Adam):
    """torch.optim.Adam whose state lives in shared memory, so every worker updates the same moments.

    The state (step, exp_avg, exp_avg_sq) is created here, at construction, exactly as stock Adam would
    create it lazily, then moved to shared memory. step() is not overridden: stock Adam updates these
    tensors in place, so with one process the result equals torch.optim.Adam's to the bit.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                # A float tensor, not an int: current Adam needs a tensor step, and a tensor can be shared.
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for tensor in state.values():
                    tensor.share_memory_()

    def share_memory(self):
        """The state is shared from the start; kept so code written as `SharedAdam(...).share_memory()` runs."""
        return self


# --- 5. Returns and loss ---------------------------------------------------------------------------

def n_step_returns(rewards, bootstrap_value, gamma):
    """Discounted returns of one rollout: R_t = r_t + gamma * R_{t+1}, with R_T = bootstrap_value.

    Args:
        rewards: [T] rewards r_0 .. r_{T-1}.
        bootstrap_value: V(s_T) if the rollout was cut or truncated, 0 if the episode terminated.
        gamma: discount factor.
    Returns: float32 tensor [T].
    """
    returns = [0.0] * len(rewards)
    running = float(bootstrap_value)
    for t in reversed(range(len(rewards))):
        running = float(rewards[t]) + gamma * running
        returns[t] = running
    return torch.tensor(returns, dtype=torch.float32)


def a3c_loss(logits, values, actions, returns, value_coef, entropy_coef):
    """policy_loss + value_coef * value_loss - entropy_coef * entropy, averaged over the T steps.

    Args: logits [T, A], values [T], actions [T] int64, returns [T].
    The advantage A_t = R_t - V(s_t) is detached in the policy term, so that term trains only the
    policy and the critic learns from the value loss alone (Mnih et al. 2016, Alg. S3).
    We average over steps instead of summing as Alg. S3 does: the gradient's scale, and so the right
    learning rate, then does not depend on the rollout length or on how many rollouts are batched.
    """
    T = logits.shape[0]
    assert logits.dim() == 2 and values.shape == (T,) and actions.shape == (T,) and returns.shape == (T,)
    log_probs = torch.log_softmax(logits, dim=-1)  # [T, A]
    advantages = (returns - values).detach()  # [T]
    policy_loss = -(log_probs.gather(1, actions.unsqueeze(1)).squeeze(1) * advantages).mean()
    value_loss = 0.5 * (returns - values).pow(2).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return policy_loss + value_coef * value_loss - entropy_coef * entropy


# --- 6. Rollouts -----------------------------------------------------------------------------------

class Rollout(NamedTuple):
    """Up to n_steps transitions of one episode, as numpy arrays (cheap to pickle through a queue)."""
    obs: np.ndarray         # [T, obs_size] float32: s_0 .. s_{T-1}
    actions: np.ndarray     # [T] int64
    rewards: np.ndarray     # [T] float32
    final_obs: np.ndarray   # [obs_size]: s_T, the state to bootstrap from unless terminated
    terminated: bool        # the MDP ended: R_T = 0
    truncated: bool         # a time limit cut the episode: R_T = V(s_T), like a rollout cut by n_steps
    episode: tuple          # (return, length) of the episode that ended in this rollout, else None
    version: int            # data mode: the policy version that chose the actions


def collect_rollout(env, model, obs, n_steps, rng, version=0):
    """Act for up to n_steps, stopping early at the end of an episode.

    Returns (rollout, next_obs). A rollout never spans two episodes, so only its last step can need a
    bootstrap. next_obs is where the next rollout starts: the reset observation after an episode ends,
    which is never the state to bootstrap from (that is rollout.final_obs).
    """
    obs_buf = np.empty((n_steps, obs.shape[0]), dtype=np.float32)
    actions = np.empty(n_steps, dtype=np.int64)
    rewards = np.empty(n_steps, dtype=np.float32)
    terminated = truncated = False
    episode = None
    for t in range(n_steps):
        obs_buf[t] = obs
        actions[t] = sample_action(model, obs, rng)
        obs, rewards[t], terminated, truncated, info = env.step(actions[t])
        obs = np.asarray(obs, dtype=np.float32)
        if terminated or truncated:
            episode = (float(info["episode"]["r"]), int(info["episode"]["l"]))
            break
    T = t + 1
    rollout = Rollout(obs_buf[:T], actions[:T], rewards[:T], obs, terminated, truncated, episode, version)
    if episode is not None:
        obs = np.asarray(env.reset()[0], dtype=np.float32)
    return rollout, obs


def rollout_loss(model, rollouts, gamma, value_coef, entropy_coef):
    """The A3C loss of one or more rollouts under the model's current parameters.

    One forward pass covers every state s_0..s_T of every rollout; V(s_T) serves as the bootstrap
    value (without gradient) unless the episode terminated.
    """
    obs = torch.from_numpy(np.concatenate([np.vstack([r.obs, r.final_obs]) for r in rollouts]))
    logits, values = model(obs)  # [sum(T+1), A], [sum(T+1)]
    keep, returns, start = [], [], 0
    for r in rollouts:
        T = len(r.rewards)
        bootstrap = 0.0 if r.terminated else values[start + T].item()
        returns.append(n_step_returns(r.rewards, bootstrap, gamma))
        keep.extend(range(start, start + T))
        start += T + 1
    keep = torch.tensor(keep)
    actions = torch.from_numpy(np.concatenate([r.actions for r in rollouts]))
    return a3c_loss(logits[keep], values[keep], actions, torch.cat(returns), value_coef, entropy_coef)


# --- 7. Workers ------------------------------------------------------------------------------------

def sync_model(local_model, shared_model):
    """Copy the shared weights into the local model in place (no new tensors, no new network)."""
    with torch.no_grad():
        for local, shared in zip(local_model.parameters(), shared_model.parameters()):
            local.copy_(shared)


def hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm):
    """Back-propagate the loss into the local model and apply that gradient to the shared model.

    Since torch 2.0 zero_grad() sets gradients to None, so the old trick of aliasing the local
    gradients into the shared parameters once would leave them summing across updates: we clear the
    local gradients and hand them over again on every update, so each step applies this loss alone.
    There is no lock: workers overwrite each other's updates now and then, which Hogwild (Recht et
    al. 2011) shows costs little, and which is how Mnih et al. 2016 ran A3C.
    """
    local_model.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(local_model.parameters(), max_grad_norm)
    for local, shared in zip(local_model.parameters(), shared_model.parameters()):
        shared.grad = local.grad
    optimizer.step()


def worker_setup(rank, args):
    """What every worker does first: one thread, seeds, its own env, its own local model."""
    torch.set_num_threads(1)  # two cores: a worker that spawns threads only slows the others down
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process decides
    seed = args.seed + rank
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = make_env(args.env, seed)
    obs = np.asarray(env.reset(seed=seed)[0], dtype=np.float32)
    model = ActorCritic(env.observation_space.shape[0], env.action_space.n, args.hidden)
    return env, model, obs, rng


def parent_alive(parent_pid):
    """A worker whose parent died (even by SIGKILL) is re-parented: stop rather than run on as an orphan."""
    return os.getppid() == parent_pid


def gradient_worker(rank, args, shared_model, optimizer, global_step, episode_queue, stop_event, parent_pid):
    """Hogwild worker (Mnih et al. 2016, Alg. S3): act, compute the gradient, apply it to the shared model."""
    try:
        env, local_model, obs, rng = worker_setup(rank, args)
        while not stop_event.is_set() and parent_alive(parent_pid):
            sync_model(local_model, shared_model)
            rollout, obs = collect_rollout(env, local_model, obs, args.n_steps, rng)
            loss = rollout_loss(local_model, [rollout], args.gamma, args.value_coef, args.entropy_coef)
            hogwild_update(local_model, shared_model, optimizer, loss, args.max_grad_norm)
            with global_step.get_lock():
                global_step.value += len(rollout.rewards)
            if rollout.episode is not None:
                episode_queue.put((rank, *rollout.episode))
    except Exception:
        print(f"worker {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        episode_queue.cancel_join_thread()  # never block this process's exit on unread messages


def data_worker(rank, args, shared_model, policy_version, global_step, rollout_queue, stop_event, parent_pid):
    """Data-parallel worker: act with a fresh copy of the shared weights, send the rollout to the learner."""
    try:
        env, local_model, obs, rng = worker_setup(rank, args)
        while not stop_event.is_set() and parent_alive(parent_pid):
            version = policy_version.value  # read first: the weights copied next are at least this new
            sync_model(local_model, shared_model)
            rollout, obs = collect_rollout(env, local_model, obs, args.n_steps, rng, version)
            with global_step.get_lock():
                global_step.value += len(rollout.rewards)
            # The queue is bounded, so a slow learner holds the workers back instead of letting
            # rollouts (and policy lag) pile up; the timeout keeps checking whether to stop.
            while not stop_event.is_set() and parent_alive(parent_pid):
                try:
                    rollout_queue.put(rollout, timeout=0.1)
                    break
                except queue.Full:
                    pass
    except Exception:
        print(f"worker {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        rollout_queue.cancel_join_thread()


# --- 8. Learner (data mode) ------------------------------------------------------------------------

def learner_update(model, optimizer, rollouts, args):
    """One step of the central learner on a batch of rollouts, with its current parameters.

    A3C has no off-policy correction: the actions were sampled by weights a few updates old (the
    policy lag), and the gradient treats them as on-policy. IMPALA's V-trace is the fix for large lags.
    """
    loss = rollout_loss(model, rollouts, args.gamma, args.value_coef, args.entropy_coef)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()


# --- 9. Monitor and training loop ------------------------------------------------------------------

class Monitor:
    """Episode statistics, progress lines and the stop criteria, the same in both modes."""

    def __init__(self, args, target_return):
        self.args, self.target_return = args, target_return
        self.recent = deque(maxlen=100)
        self.episodes = 0
        self.start = self.last_print = time.perf_counter()
        self.lags = []

    def add_episode(self, episode_return):
        self.episodes += 1
        self.recent.append(episode_return)

    def mean_return(self):
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def solved(self):
        return len(self.recent) == self.recent.maxlen and self.mean_return() >= self.target_return

    def done(self, steps):
        return (self.solved() or (self.args.max_episodes is not None and self.episodes >= self.args.max_episodes)
                or (self.args.max_steps is not None and steps >= self.args.max_steps))

    def progress(self, steps, force=False):
        now = time.perf_counter()
        if not force and now - self.last_print < self.args.log_interval:
            return
        self.last_print = now
        elapsed = now - self.start
        line = (f"episodes={self.episodes} steps={steps} steps_per_second={steps / elapsed:.0f} "
                f"mean_return={self.mean_return():.1f} seconds={elapsed:.1f}")
        if self.lags:
            line += f" mean_lag={sum(self.lags) / len(self.lags):.2f}"
            self.lags.clear()
        print(line, flush=True)

    def summary(self, steps):
        elapsed = time.perf_counter() - self.start
        return {"solved": self.solved(), "episodes": self.episodes, "steps": steps, "seconds": elapsed,
                "steps_per_second": steps / elapsed, "mean_return": self.mean_return()}


def check_workers(processes):
    for rank, proc in enumerate(processes):
        if proc.exitcode not in (None, 0):
            raise RuntimeError(f"worker {rank} died with exit code {proc.exitcode}")


def stop_processes(processes, queues):
    """Stop every worker, whatever state the queues are in: never hang, never leave one behind."""
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        for q in queues:  # a child blocked on a full queue, or flushing one, exits once it is drained
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
        for p in processes:
            p.join(timeout=0.05)
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(timeout=1)
        if p.is_alive():
            p.kill()
            p.join()
    for q in queues:
        q.cancel_join_thread()
        q.close()


def train(args):
    """Train until solved or a budget runs out; returns a summary dict. The monitor runs here, in the
    main process, and so does the learner in data mode: it is the single writer of the weights and it
    holds the optimizer, so the weights never need to travel back from another process."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    env = make_env(args.env)
    obs_size, n_actions = env.observation_space.shape[0], env.action_space.n
    target_return = args.target_return if args.target_return is not None else env.spec.reward_threshold
    env.close()
    if target_return is None:
        raise ValueError(f"{args.env} has no reward_threshold: give --target-return")

    shared_model = ActorCritic(obs_size, n_actions, args.hidden)
    shared_model.share_memory()
    ctx = mp.get_context("spawn")  # explicit: the same on Linux, macOS and Python 3.14
    global_step = ctx.Value("q", 0)
    stop_event = ctx.Event()
    parent_pid = os.getpid()
    if args.mode == "gradient":
        optimizer = SharedAdam(shared_model.parameters(), lr=args.lr)
        messages = ctx.Queue()  # (rank, return, length) of each finished episode
        target, shared = gradient_worker, (shared_model, optimizer, global_step, messages)
    else:
        optimizer = torch.optim.Adam(shared_model.parameters(), lr=args.lr)
        policy_version = ctx.Value("q", 0)
        messages = ctx.Queue(maxsize=2 * args.workers)  # rollouts
        target, shared = data_worker, (shared_model, policy_version, global_step, messages)
        batch_size = args.batch_rollouts or args.workers

    monitor = Monitor(args, target_return)
    processes = [ctx.Process(target=target, args=(rank, args, *shared, stop_event, parent_pid), daemon=True)
                 for rank in range(args.workers)]
    for proc in processes:
        proc.start()
    try:
        batch = []
        while not monitor.done(global_step.value):
            try:
                message = messages.get(timeout=0.1)
            except queue.Empty:
                check_workers(processes)
                monitor.progress(global_step.value)
                continue
            if args.mode == "gradient":
                monitor.add_episode(message[1])
            else:
                if message.episode is not None:
                    monitor.add_episode(message.episode[0])
                batch.append(message)
                if len(batch) >= batch_size:
                    learner_update(shared_model, optimizer, batch, args)
                    monitor.lags.extend(policy_version.value - r.version for r in batch)
                    with policy_version.get_lock():
                        policy_version.value += 1
                    batch = []
            monitor.progress(global_step.value)
    finally:
        stop_event.set()
        stop_processes(processes, [messages])
    monitor.progress(global_step.value, force=True)
    torch.save(shared_model.state_dict(), args.save)
    return monitor.summary(global_step.value)


def main(argv=None):
    args = parse_args(argv)
    summary = train(args)
    print("result: solved={} episodes={} steps={} seconds={:.1f} steps_per_second={:.0f} mean_return={:.1f}".format(
        "yes" if summary["solved"] else "no", summary["episodes"], summary["steps"], summary["seconds"],
        summary["steps_per_second"], summary["mean_return"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
