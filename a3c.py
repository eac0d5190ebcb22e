"""Asynchronous Advantage Actor-Critic (A3C) in one file, for PyTorch and Gymnasium on the CPU.

Workers act in parallel; --mode picks how their experience becomes learning:
  --mode gradient  each worker computes the gradient of its own rollouts and applies it to the shared model
                   through a shared-state Adam, without locks (Hogwild, as in the paper);
  --mode data      workers only act, and one learner (the main process) learns from their rollouts.
Each worker steps --envs-per-worker envs together: with 1 it is the paper's actor-learner; one worker with N envs
is A2C. The algorithm is sections 3 to 8; start at gradient_worker, which maps Algorithm S3 onto the code.

    python a3c.py --workers 4 --mode gradient

References: Mnih et al. 2016, arXiv:1602.01783 (Algorithm S3); Recht et al. 2011, "Hogwild!", arXiv:1106.5730;
Schulman et al. 2016, "Generalized Advantage Estimation", arXiv:1506.02438 (--gae-lambda).
"""
import argparse
import contextlib
import ctypes
import csv
import importlib
import itertools
import math
import os
import queue
import signal
import sys
import time
import traceback
import warnings
from collections import deque
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn as nn


# --- 1. Command line -------------------------------------------------------------------------------

class UsageError(Exception):
    """Bad input: reported in one line, with exit code 2, before any process is started."""


def require(ok, message):
    """A usage rule: broken, it is a UsageError."""
    if not ok:
        raise UsageError(message)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Number:
    """An argparse type: a finite int or float within [low, high], or (low, high] with low_open. Every numeric flag
    has both bounds, so that no value can start a run that then fails (a seed numpy refuses, a rate that
    overflows, a budget of processes or memory no machine has)."""

    def __init__(self, kind, low, high, low_open=False):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if self.kind is int else ' number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < self.low or (self.low_open and value == self.low) or value > self.high:
            low, high = (f"{bound:,}" if self.kind is int else f"{bound:g}" for bound in (self.low, self.high))
            raise argparse.ArgumentTypeError(f"{text} must be in {'(' if self.low_open else '['}{low}, {high}]")
        return value


def make_parser():
    """The command line's flags, each with its range and default; the README's flag table says more of each."""
    count, positive = (lambda high: Number(int, 1, high)), (lambda high: Number(float, 0, high, low_open=True))
    p = OneLineParser(prog="a3c.py", description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--workers", type=count(256), default=4, help="worker processes")
    add("--mode", choices=["gradient", "data"], default="gradient", help="who learns: each worker, or one learner")
    add("--env", type=str, default=None, help="Gymnasium id (none: CartPole-v1, or the checkpoint's)")
    add("--seed", type=Number(int, 0, 2**32 - 1), default=0, help="the run's seed, from which every stream's is drawn")
    add("--lr", type=positive(1), default=2e-3, help="Adam's learning rate")
    add("--lr-schedule", choices=["constant", "linear"], default="constant", help="linear: to 0 at --max-steps")
    add("--gamma", type=positive(1), default=0.99, help="discount factor")
    add("--n-steps", type=count(10_000), default=10, help="steps in each env between two updates")
    add("--envs-per-worker", type=count(256), default=4, help="envs each worker steps together")
    add("--entropy-coef", type=Number(float, 0, 10), default=0.01, help="weight of the entropy bonus")
    add("--value-coef", type=Number(float, 0, 10), default=0.5, help="weight of the value loss")
    add("--reward-scale", type=positive(1000), default=None, help="rewards times this for the critic "
        "(none: 0.1, or 1 with --normalize-reward)")
    add("--gae-lambda", type=Number(float, 0, 1), default=1.0, help="GAE's lambda (1: the paper's n-step returns)")
    add("--normalize-obs", action="store_true", help="normalise vector observations by shared running statistics")
    add("--normalize-reward", action="store_true", help="divide rewards by the discounted return's running std")
    add("--log-std-init", type=Number(float, -20, 2), default=0.0, help="Box actions: the Gaussian's initial log std")
    add("--lstm", action="store_true", help="A3C LSTM: an LSTM core between the torso and the heads")
    add("--frame-stack", type=count(64), default=None, help="frames an observation holds (none: 4)")
    add("--separate-critic", action="store_true", help="a torso of its own for the value head")
    add("--max-grad-norm", type=positive(1000), default=5.0, help="clip each update's gradient norm")
    add("--hidden", type=count(4096), default=None, help="hidden width (none: 64 for vectors, 256 for frames)")
    add("--batch-buffers", type=count(1024), default=None, help="data mode: buffers per update (none: --workers)")
    add("--max-episodes", type=count(10**12), default=None, help="stop after this many episodes")
    add("--max-steps", type=count(10**12), default=None, help="stop after this many env steps")
    add("--target-return", type=Number(float, -1e12, 1e12), default=None,
        help="stop when the mean of the last 100 episodes reaches it (none: the env's reward_threshold)")
    add("--log-interval", type=positive(86_400), default=2.0, help="seconds between progress lines")
    add("--log-csv", type=str, default=None, help="write one row per finished episode to this CSV")
    add("--tensorboard", type=str, default=None, metavar="DIR", help="write TensorBoard event files to DIR")
    add("--save", type=str, default="a3c_model.pth", help="the checkpoint (with --resume: the one resumed from)")
    add("--save-every", type=positive(86_400), default=60.0, help="seconds between checkpoints")
    add("--resume", type=str, default=None, metavar="PATH", help="continue the run a checkpoint saved, with its flags")
    add("--eval", type=str, default=None, metavar="PATH", help="play greedy episodes with a checkpoint's policy")
    add("--episodes", type=count(10**6), default=10, help="episodes to play with --eval")
    add("--render", action="store_true", help="with --eval: show the env in a window")
    add("--video", type=str, default=None, metavar="DIR", help="with --eval: write one MP4 per episode to DIR")
    return p


def parse_args(argv=None, defaults=None):
    """Parse the command line; tests call parse_args([...]) with their own flags. defaults replace the parser's
    (a resumed run's are its checkpoint's)."""
    parser = make_parser()
    parser.set_defaults(**(defaults or {}))
    return parser.parse_args(argv)


# --- 2. Environment --------------------------------------------------------------------------------

def make_env(env_id, seed=None, render_mode=None, frame_stack=4):
    """A Gymnasium env that reports each episode's true return in info["episode"]. The TimeLimit stays: it tells a
    truncation from a termination. Box actions: the policy acts in [-1, 1], RescaleAction maps that onto the env's
    bounds, and ClipAction clips a sample on its way in; the rollout keeps the sample, whose log pi the loss needs."""
    if env_id.startswith("ALE/") or env_id not in gym.registry:  # Atari ids exist once ale-py registers them
        try:
            import ale_py
        except ImportError:
            if env_id.startswith("ALE/"):
                raise ValueError(f"{env_id}: Atari needs ale-py: pip install 'gymnasium[atari]'") from None
        else:
            gym.register_envs(ale_py)
    entry_point = str(gym.spec(env_id).entry_point) if env_id in gym.registry else ""
    if "mujoco" in entry_point:
        mujoco_warnings_to_stderr()
    atari = entry_point.startswith("ale_py")
    env = gym.make(env_id, render_mode=render_mode, **({"obs_type": "grayscale"} if atari else {}))  # ALE's is fast
    if env.spec.kwargs.get("frameskip") == 1:  # an emulator that shows every frame (ALE's NoFrameskip ids):
        env = gym.wrappers.MaxAndSkipObservation(env, skip=4)  # act every 4th, see the max of the last 2 (DQN)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    obs_space, action_space = env.observation_space, env.action_space
    if isinstance(obs_space, gym.spaces.Box) and obs_space.dtype == np.uint8 and len(obs_space.shape) in (2, 3):
        env = pixels_to_frames(env, frame_stack)
    elif not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        env.close()
        raise ValueError(f"{env_id}: observation space {obs_space} is neither a 1-D Box nor a uint8 image")
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
            env.close()
            raise ValueError(f"{env_id}: action space {action_space} has infinite bounds: no scaling to [-1, 1]")
        box = np.ones(action_space.shape, action_space.dtype)
        env = gym.wrappers.ClipAction(gym.wrappers.RescaleAction(env, -box, box))
    elif not isinstance(action_space, gym.spaces.Discrete):
        env.close()
        raise ValueError(f"{env_id}: action space {action_space} is neither Discrete nor a 1-D Box")
    if seed is not None:
        env.action_space.seed(seed)
    return env


def mujoco_warnings_to_stderr():
    """MuJoCo writes its warnings to MUJOCO_LOG.TXT in the working directory: print each one once on stderr
    instead, so that a run leaves no file it was not asked for (a forked worker inherits what was shown)."""
    import mujoco
    if mujoco.get_mju_user_warning() is not None:
        return
    shown = set()

    def warn(message):
        if message not in shown:
            shown.add(message)
            print(f"a3c.py: MuJoCo warning: {message}", file=sys.stderr, flush=True)
    mujoco.set_mju_user_warning(warn)


def pixels_to_frames(env, frame_stack=4):
    """Screens to what the conv torso reads, as in DQN and A3C but without OpenCV: grayscale, each side halved
    by averaging 2x2 blocks (210x160 -> 105x80, about the usual 84x84), the last frame_stack frames stacked,
    uint8 until the network. Rewards are clipped to [-1, 1] for learning only; the episode return reported
    comes from RecordEpisodeStatistics, inside these wrappers, so it is the game's score."""
    height, width = env.observation_space.shape[0] // 2, env.observation_space.shape[1] // 2

    def downsample(pixels):
        if pixels.ndim == 3:  # colour: luminance (ITU-R 601)
            pixels = (pixels @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        pixels = pixels[:2 * height, :2 * width].astype(np.uint16)  # integers: a float mean costs more than ALE
        total = pixels[0::2, 0::2] + pixels[1::2, 0::2] + pixels[0::2, 1::2] + pixels[1::2, 1::2]
        return (total >> 2).astype(np.uint8)

    env = gym.wrappers.ClipReward(env, -1.0, 1.0)
    env = gym.wrappers.TransformObservation(env, downsample, gym.spaces.Box(0, 255, (height, width), np.uint8))
    return gym.wrappers.FrameStackObservation(env, frame_stack)


def observation_batch(observations):
    """Stack observations for the network: vectors become float32, frames stay uint8 until the network."""
    obs = np.stack(observations)
    return obs if obs.dtype == np.uint8 else obs.astype(np.float32)


def env_spaces(env):
    """What ActorCritic needs to know of an env: obs_size (a vector's length, or stacked frames' (C, H, W)),
    n_actions (Discrete: the choices; Box: the dimensions) and continuous."""
    space, shape = env.action_space, env.observation_space.shape
    continuous = isinstance(space, gym.spaces.Box)
    return {"obs_size": shape[0] if len(shape) == 1 else tuple(shape), "continuous": continuous,
            "n_actions": space.shape[0] if continuous else int(space.n)}


class RunningMeanStd(nn.Module):
    """The running mean and variance, per dimension, of the observations (--normalize-obs) or of the discounted
    return (--normalize-reward). Buffers, so that they are shared with the weights and saved in state_dict; workers
    update them without a lock, as Hogwild writes the weights (a lock held by a killed worker would hang the rest)."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))

    def update(self, batch):
        """Fold in a batch [N, *shape], in place, by the parallel formula of Chan et al. (1979)."""
        batch = torch.as_tensor(batch, dtype=torch.float64)
        n, count = batch.shape[0], self.count.item()
        total = count + n
        delta = batch.mean(0) - self.mean
        self.var.copy_((self.var * count + batch.var(0, correction=0) * n + delta.square() * (count * n / total))
                       / total)
        self.mean.add_(delta * (n / total))
        self.count.fill_(total)

    def std(self):
        return torch.sqrt(self.var + 1e-8).float()

    def normalize(self, x, clip=10.0):
        # clipped, as VecNormalize does, so that a state far outside what was seen cannot saturate a layer
        return ((x - self.mean.float()) / self.std()).clamp(-clip, clip)


# --- 3. Network ------------------------------------------------------------------------------------

class CategoricalHead(nn.Module):
    """Discrete actions: one logit per action, pi(.|s) = softmax(logits)."""
    action_dtype = torch.int64

    def __init__(self, hidden, n_actions):
        super().__init__()
        self.out = nn.Linear(hidden, n_actions)
        self.action_shape = ()

    def forward(self, h):
        return self.out(h)  # [B, A] logits

    def log_prob_entropy(self, logits, actions):
        """log pi(a_t|s_t) [T] and the entropy of pi(.|s_t) [T]: logits [T, A], actions [T] int64."""
        log_probs = torch.log_softmax(logits, dim=-1)  # [T, A]
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return log_probs.gather(1, actions.unsqueeze(1)).squeeze(1), entropy

    def sample(self, logits, rng):  # Gumbel-max: an exact sample of softmax(logits), cheaper than torch's on a few rows
        return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)  # [K]

    def most_probable(self, logits):
        return np.argmax(logits, axis=1)

    def bound_loss(self, logits):  # any logits are a distribution
        return 0.0


class GaussianHead(nn.Module):
    """Box actions, scaled to [-1, 1] by make_env: a ~ N(mean(s), sigma^2) in each dimension, the mean linear (as in
    the paper, and kept near the box by bound_loss), log sigma a parameter; the env clips the samples."""
    action_dtype = torch.float32

    def __init__(self, hidden, action_dims, log_std_init=0.0):
        super().__init__()
        self.out = nn.Linear(hidden, action_dims)
        self.log_std = nn.Parameter(torch.full((action_dims,), float(log_std_init)))
        self.action_shape = (action_dims,)

    def forward(self, h):
        return self.out(h)  # [B, D] means

    def log_prob_entropy(self, mean, actions):
        """log pi(a_t|s_t) [T] and the entropy [T] (mean [T, D], actions [T, D]), summed over the dimensions:
        log N(a; mu, sigma) = -(a - mu)^2 / 2 sigma^2 - log sigma - log(2 pi) / 2, H = log sigma + (1 + log 2pi) / 2"""
        log_probs = -0.5 * ((actions - mean) / self.log_std.exp()).pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)
        entropy = (self.log_std + 0.5 * (1 + math.log(2 * math.pi))).sum(-1).expand(mean.shape[0])
        return log_probs.sum(-1), entropy

    def sample(self, mean, rng):
        std = np.exp(self.log_std.detach().numpy())  # [D]
        return (mean + std * rng.standard_normal(mean.shape)).astype(np.float32)  # [K, D], not clipped

    def most_probable(self, mean):
        return mean

    def bound_loss(self, mean):
        """(|mean| - 1)^2 past the box, summed over dimensions, averaged over steps: far outside, every sample clips to
        one action and the policy gradient cannot tell the way back; this can (a tanh-bounded mean's would vanish)."""
        return (mean.abs() - 1).clamp(min=0).pow(2).sum(-1).mean()


class ConvTorso(nn.Module):
    """Stacked uint8 frames [B, C, H, W] -> features [B, hidden]: the A3C paper's network (16 8x8 filters, stride 4;
    32 4x4, stride 2; a fully connected layer)."""

    def __init__(self, frames_shape, hidden):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(frames_shape[0], 16, 8, stride=4), nn.ReLU(),
                                   nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, *frames_shape)).shape[1]
        self.fc = nn.Linear(flat, hidden)

    def forward(self, frames):
        frames = frames.contiguous(memory_format=torch.channels_last)  # uint8 until the division below
        return torch.relu(self.fc(self.convs(frames.float() / 255)))


class NoCore(nn.Module):
    """The feed-forward agent's core: features pass through, and its core state has size 0."""
    state_size = 0

    def forward(self, features, core_state, lengths=None):
        return features, core_state


class LSTMCore(nn.Module):
    """--lstm: LSTM cells between the torso and the heads (the paper's A3C LSTM), the heads reading features + h, so
    that the agent sees the present from the start; the gates written out, W x_t of a whole rollout in one product."""

    def __init__(self, hidden):
        super().__init__()
        self.input_weights = nn.Linear(hidden, 4 * hidden)  # W x_t + b, for the gates i, f, g, o
        self.hidden_weights = nn.Linear(hidden, 4 * hidden, bias=False)  # U h_{t-1}
        self.state_size = 2 * hidden  # h and c side by side
        for layer in (self.input_weights, self.hidden_weights):
            nn.init.orthogonal_(layer.weight)
        nn.init.zeros_(self.input_weights.bias)

    def step(self, input_gates, h, c):  # c_t = sig(f) c_{t-1} + sig(i) tanh(g); h_t = sig(o) tanh(c_t)
        i, f, g, o = (input_gates + self.hidden_weights(h)).chunk(4, dim=1)  # W x_t + b + U h_{t-1}
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, features, core_state, lengths=None):
        """features [N, hidden] of n sequences laid end to end, lengths [n] (None: N sequences of one step),
        core_state [n, 2 * hidden] before each -> (features + h [N, hidden], core_state after each)."""
        h, c = core_state.chunk(2, dim=1)
        input_gates = self.input_weights(features)  # [N, 4 * hidden]: only U h_{t-1} waits for the step before
        if lengths is None:  # acting: one step of each env
            h, c = self.step(input_gates, h, c)
            return features + h, torch.cat([h, c], dim=1)
        valid = torch.arange(max(lengths)) < torch.as_tensor(lengths)[:, None]  # [n, T]: sequence i has a step t
        padded_gates = input_gates.new_zeros(*valid.shape, input_gates.shape[1])  # [n, T, 4 * hidden]
        padded_gates[valid] = input_gates
        outputs = []
        for t in range(valid.shape[1]):  # learning: step t of every sequence at once
            h_next, c_next = self.step(padded_gates[:, t], h, c)
            going = valid[:, t:t + 1]  # a sequence that has ended keeps its last state
            h, c = torch.where(going, h_next, h), torch.where(going, c_next, c)
            outputs.append(h)
        return features + torch.stack(outputs, 1)[valid], torch.cat([h, c], dim=1)


MODEL_FLAGS = ("normalize_obs", "normalize_reward", "separate_critic", "lstm")  # on/off flags that shape the model


class ActorCritic(nn.Module):
    """A torso, a core, a policy head, a value head V(s) and the running statistics. The file's three choices are
    made here alone: the observation picks the torso (two tanh layers for a vector, ConvTorso for frames), --lstm
    the core, the action space the head; the rest calls the head and passes the core state along, whatever it is."""

    def __init__(self, obs_size, n_actions, hidden=64, continuous=False, normalize_obs=False,
                 normalize_reward=False, separate_critic=False, lstm=False, log_std_init=0.0):
        super().__init__()
        self.config = {"obs_size": obs_size, "n_actions": n_actions, "continuous": continuous, "hidden": hidden,
                       "normalize_obs": normalize_obs, "normalize_reward": normalize_reward,
                       "separate_critic": separate_critic, "lstm": lstm}  # what a checkpoint rebuilds it from
        self.obs_stats = RunningMeanStd((obs_size,)) if normalize_obs else None
        self.return_stats = RunningMeanStd() if normalize_reward else None

        def torso():
            if isinstance(obs_size, int):
                return nn.Sequential(nn.Linear(obs_size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
            return ConvTorso(obs_size, hidden)
        self.torso = torso()
        self.critic_torso = torso() if separate_critic else None  # the value loss then cannot pull on the policy's
        self.core = LSTMCore(hidden) if lstm else NoCore()
        self.policy = (GaussianHead(hidden, n_actions, log_std_init) if continuous
                       else CategoricalHead(hidden, n_actions))
        self.value = nn.Linear(hidden, 1)
        # Orthogonal init: a tiny policy layer starts near uniform (or mean 0), a unit-scale value head near returns
        torsos = [(layer, math.sqrt(2)) for part in (self.torso, self.critic_torso) if part is not None
                  for layer in part.modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]
        for layer, gain in torsos + [(self.policy.out, 0.01), (self.value, 1.0)]:
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
        self.to(memory_format=torch.channels_last)  # the layout oneDNN's CPU convolutions run fastest in

    def forward(self, obs, core_state=None, lengths=None):
        """obs [N, obs_size] float32 or [N, C, H, W] uint8: n sequences of steps laid end to end, lengths [n]
        (None: N sequences of one step), core_state [n, state_size] before each (None: zero) -> (policy head
        output [N, n_actions], V(s) [N], core_state after each sequence [n, state_size])."""
        if self.obs_stats is not None:
            obs = self.obs_stats.normalize(obs)
        if core_state is None:
            core_state = self.initial_core_state(len(obs) if lengths is None else len(lengths))
        h, core_state = self.core(self.torso(obs), core_state, lengths)
        h_critic = h if self.critic_torso is None else self.critic_torso(obs)
        return self.policy(h), self.value(h_critic).squeeze(-1), core_state

    def initial_core_state(self, n):
        return torch.zeros(n, self.core.state_size)  # [n, state_size]: an episode starts from zero

    def reward_normalization(self):
        """--normalize-reward's factor on rewards: 1 / the discounted return's running std (VecNormalize's), or 1."""
        return 1.0 if self.return_stats is None else 1.0 / self.return_stats.std().item()


def new_model(spaces, args):
    """The ActorCritic for an env's spaces (env_spaces, or a checkpoint's), shaped by the flags."""
    return ActorCritic(**spaces, hidden=args.hidden, log_std_init=args.log_std_init,
                       **{flag: getattr(args, flag) for flag in MODEL_FLAGS})


# --- 4. Shared optimizer ---------------------------------------------------------------------------

class SharedAdam(torch.optim.Adam):
    """torch.optim.Adam whose state lives in shared memory, so that every Hogwild worker updates the same moments:
    the paper shares RMSProp's statistics, this shares those of the optimizer torch users reach for. It takes Adam's
    arguments, and step() is stock Adam's, updating the shared tensors in place (with one process it equals
    torch.optim.Adam to the bit). To reuse it: CPU parameters in shared memory (model.share_memory()); build it,
    and load_state_dict, before the workers start; a param group added later is not shared."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.share_memory()

    def load_state_dict(self, state_dict):
        """Adam's, which replaces the state with new tensors, or with none for a parameter that had not been updated
        (a plain Adam saved before its first step): the missing state is created and all of it shared again."""
        super().load_state_dict(state_dict)
        self.share_memory()

    def share_memory(self):
        """Give every parameter the state stock Adam would create at its first step, and move it all to shared
        memory; a worker forked later then updates these tensors, not copies of its own."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # a tensor, as current Adam keeps it, and so sharable
                    for name in ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else []):
                        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for tensor in state.values():
                    tensor.share_memory_()
        return self


def set_learning_rate(optimizer, args, steps):
    """Set and return Adam's rate after the run's steps (a resumed run's included): --lr, or lr (1 - steps / max_steps)
    with --lr-schedule linear (CleanRL's anneal_lr), so that the last updates refine what was learned."""
    lr = args.lr
    if args.lr_schedule == "linear" and args.max_steps is not None:
        lr = args.lr * max(0.0, 1.0 - steps / args.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr  # a float: the fused kernel takes it as it is
    return lr


# --- 5. Rollouts -----------------------------------------------------------------------------------

class RolloutBuffer(NamedTuple):
    """A worker's n_steps x K transitions; shared in data mode, where only a rollout's place crosses the pipe."""
    obs: torch.Tensor         # [n_steps, K, obs_size] float32 or [n_steps, K, C, H, W] uint8: s_t
    actions: torch.Tensor     # [n_steps, K] int64 or [n_steps, K, D] float32, as sampled: a_t
    rewards: torch.Tensor     # [n_steps, K] float32: r_t
    final_obs: torch.Tensor   # like obs: s_{t+1} at [t, k] where env k's rollout ends after step t
    core_state: torch.Tensor  # [n_steps, K, state_size] float32: the core state before step t

    @classmethod
    def allocate(cls, model, n_steps, n_envs, shared=False):
        size = model.config["obs_size"]  # frames stay uint8 (observation_batch)
        obs_shape, obs_dtype = ((size,), torch.float32) if isinstance(size, int) else (size, torch.uint8)
        buffer = cls(torch.zeros(n_steps, n_envs, *obs_shape, dtype=obs_dtype),
                     torch.zeros(n_steps, n_envs, *model.policy.action_shape, dtype=model.policy.action_dtype),
                     torch.zeros(n_steps, n_envs), torch.zeros(n_steps, n_envs, *obs_shape, dtype=obs_dtype),
                     torch.zeros(n_steps, n_envs, model.core.state_size))
        return cls(*(field.share_memory_() for field in buffer)) if shared else buffer

    def numpy(self):  # views: numpy writes and slices cost less, element by element
        return RolloutBuffer(*(field.numpy() for field in self))


class Rollout(NamedTuple):
    """One rollout of Alg. S3: the steps start .. stop - 1 of the worker's env env_index in a RolloutBuffer, ended
    with its episode or with the buffer, so that only its last step can need a bootstrap."""
    env_index: int
    start: int
    stop: int
    terminated: bool  # the episode ended in a terminal state: R_T = 0; else (time limit or cut) R_T = V(s_T)
    episode: tuple    # (return, length) of the episode that ended with this rollout, else None


def collect_rollouts(envs, model, obs, core_state, buffer, rng):
    """Act the buffer's n_steps in a worker's K envs, updating obs [K, ...] and core_state [K, state_size] in place.
    An episode that ends closes its env's rollout; the env is reset and its core state zeroed (the new episode
    must not remember the old one), and final_obs keeps the episode's last observation, not the reset one."""
    views = buffer.numpy()
    n_steps, starts, rollouts = len(views.obs), [0] * len(envs), []  # starts: where each env's open rollout began
    for t in range(n_steps):
        views.obs[t] = obs
        views.core_state[t] = core_state
        with torch.inference_mode():  # a_k ~ pi(.|s_k) for every env k at once
            head_out, _, next_core_state = model(torch.from_numpy(obs), torch.from_numpy(core_state))
        views.actions[t] = model.policy.sample(head_out.numpy(), rng)
        core_state[:] = next_core_state.numpy()
        for k, env in enumerate(envs):
            next_obs, reward, terminated, truncated, info = env.step(views.actions[t, k])
            views.rewards[t, k] = reward
            if terminated or truncated:
                views.final_obs[t, k] = next_obs
                episode = (float(info["episode"]["r"]), int(info["episode"]["l"]))
                rollouts.append(Rollout(k, starts[k], t + 1, terminated, episode))
                next_obs, _ = env.reset()
                core_state[k], starts[k] = 0.0, t + 1
            obs[k] = next_obs
    for k in range(len(envs)):  # rollouts cut by n_steps: bootstrap from the current observation
        if starts[k] < n_steps:
            views.final_obs[n_steps - 1, k] = obs[k]
            rollouts.append(Rollout(k, starts[k], n_steps, False, None))
    return rollouts


# --- 6. Returns and loss ---------------------------------------------------------------------------

def n_step_returns(rewards, bootstrap_value, gamma):
    """Alg. S3: R = bootstrap_value (0 if s_T is terminal, else V(s_T)); R <- r_t + gamma R, t = T-1 .. 0 -> R_t [T]"""
    returns, R = [0.0] * len(rewards), float(bootstrap_value)
    for t in reversed(range(len(rewards))):
        R = float(rewards[t]) + gamma * R
        returns[t] = R
    return torch.tensor(returns, dtype=torch.float32)


def gae_advantages(rewards, values, bootstrap_value, gamma, lam):
    """GAE (Schulman et al. 2016): delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t + gamma lam A_{t+1},
    with V(s_T) = bootstrap_value. rewards [T], values [T] -> A_t [T] float32 (lam = 1: R_t - V(s_t))."""
    next_values = [float(v) for v in values[1:]] + [float(bootstrap_value)]  # V(s_{t+1})
    advantages, A = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        delta = float(rewards[t]) + gamma * next_values[t] - float(values[t])
        A = delta + gamma * lam * A
        advantages[t] = A
    return torch.tensor(advantages, dtype=torch.float32)


def a3c_loss(log_probs, entropy, values, returns, value_coef, entropy_coef, bound_loss=0.0):
    """Alg. S3's loss, -log pi(a_t|s_t) A_t + value_coef (R_t - V(s_t))^2 / 2 - entropy_coef H(pi(.|s_t)), with
    A_t = R_t - V(s_t) detached so that the policy term does not train the critic; a mean where Alg. S3 sums, so
    that the right learning rate does not depend on the batch's size. Plus bound_loss, the Gaussian head's pull
    on a mean past the action box (0 for discrete actions). Args [T] each -> loss, its terms (floats)."""
    assert log_probs.dim() == 1 and log_probs.shape == entropy.shape == values.shape == returns.shape  # [T] each
    advantages = (returns - values).detach()  # [T]
    policy_loss = -(log_probs * advantages).mean()
    value_loss = 0.5 * (returns - values).pow(2).mean()
    entropy = entropy.mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy + bound_loss
    return loss, {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}


def explained_variance(values, returns):
    """1 - Var(R - V) / Var(R) of a batch [T]: 1 if V predicts R, 0 if no better than R's mean, nan if R is constant."""
    variance = returns.var(correction=0).item()
    return math.nan if variance == 0 else 1 - (returns - values).var(correction=0).item() / variance


def learning_pass(model, rollouts):
    """The network run again over the steps it acted on, with autograd: acting ran without it (cheaper), and in data
    mode in another process, whose graph the learner could not backpropagate through. rollouts [(buffer views,
    Rollout), ...] laid end to end, each from the core state its worker had -> head outputs [N, ...], V(s_t) [N],
    V(s_T) [n] (without gradient: it is part of the target)."""
    obs = torch.from_numpy(np.concatenate([buffer.obs[r.start:r.stop, r.env_index] for buffer, r in rollouts]))
    core_states = torch.from_numpy(np.stack([buffer.core_state[r.start, r.env_index] for buffer, r in rollouts]))
    head_out, values, final_core_states = model(obs, core_states, [r.stop - r.start for _, r in rollouts])
    with torch.no_grad():
        final_obs = torch.from_numpy(np.stack([buffer.final_obs[r.stop - 1, r.env_index] for buffer, r in rollouts]))
        _, final_values, _ = model(final_obs, final_core_states)
    return head_out, values, final_values


def rollout_loss(model, batch, gamma, value_coef, entropy_coef, reward_scale=1.0, gae_lambda=1.0):
    """The loss both modes train with: a3c_loss of a batch [(RolloutBuffer, [Rollout, ...]), ...], and its statistics.
    The critic learns returns of rewards multiplied by reward_scale (and by --normalize-reward's factor): scaling
    every reward by one factor leaves the best policy as it is, and keeps the value loss in a range where
    value_coef means the same from task to task. V is therefore in scaled units, the bootstrap V(s_T) included."""
    rollouts = [(buffer.numpy(), r) for buffer, buffer_rollouts in batch for r in buffer_rollouts]
    head_out, values, final_values = learning_pass(model, rollouts)
    scale, values_seen = reward_scale * model.reward_normalization(), values.detach().numpy()
    returns, start = [], 0
    for (buffer, r), final_value in zip(rollouts, final_values.tolist()):
        rewards = buffer.rewards[r.start:r.stop, r.env_index] * scale
        v = values_seen[start:start + len(rewards)]  # this rollout's V(s_t)
        bootstrap = 0.0 if r.terminated else final_value  # nothing follows a terminal state; V is already scaled
        if gae_lambda == 1:  # the paper's n-step returns R_t
            returns.append(n_step_returns(rewards, bootstrap, gamma))
        else:  # GAE's R_t = A_t + V(s_t)
            returns.append(gae_advantages(rewards, v, bootstrap, gamma, gae_lambda) + torch.from_numpy(v))
        start += len(rewards)
    returns = torch.cat(returns)
    actions = torch.from_numpy(np.concatenate([buffer.actions[r.start:r.stop, r.env_index] for buffer, r in rollouts]))
    log_probs, entropy = model.policy.log_prob_entropy(head_out, actions)
    loss, stats = a3c_loss(log_probs, entropy, values, returns, value_coef, entropy_coef,
                           model.policy.bound_loss(head_out))
    if not torch.isfinite(loss):  # stop before it reaches the weights: nothing learns from it, and it spreads
        raise FloatingPointError(f"the loss is {loss.item()}: training diverged (try a smaller --lr)")
    return loss, {**stats, "explained_variance": explained_variance(values.detach(), returns)}


# --- 7. Workers ------------------------------------------------------------------------------------
# A worker is a generator of (env steps taken, message for the main process or None); section 9 runs it in a
# process until training stops.

def hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm):
    """Backpropagate into the local model and hand the gradient to the shared one without a lock (Hogwild: updates
    lost now and then cost little). The well-known A3C ports make the shared .grad the local gradient tensor itself
    and clear it by zeroing the shared model's gradients. Since torch 2, zero_grad() sets .grad to None instead:
    the local gradient is never cleared, and each update applies the sum of all the gradients so far (g, 2g, 3g
    ...). Here the local gradient is cleared before each backward pass, and the shared .grad set at every update."""
    local_model.zero_grad()
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(local_model.parameters(), max_grad_norm)
    for local, shared in zip(local_model.parameters(), shared_model.parameters()):
        shared.grad = local.grad
    optimizer.step()
    return grad_norm.item()


def update_statistics(shared_model, buffer, rollouts, discounted, gamma):
    """Fold a buffer's observations, and each env's discounted return G <- r_t + gamma G (zeroed where an episode
    ends; discounted [K] carries it to the next buffer), into the shared running statistics, if any."""
    if shared_model.obs_stats is not None:
        shared_model.obs_stats.update(buffer.obs.reshape(-1, buffer.obs.shape[-1]))
    if shared_model.return_stats is not None:
        seen = np.empty(buffer.rewards.shape, np.float32)
        for t, rewards in enumerate(buffer.rewards.numpy()):
            discounted[:] = gamma * discounted + rewards
            seen[t] = discounted
            discounted[[r.env_index for r in rollouts if r.stop == t + 1 and r.episode is not None]] = 0.0
        shared_model.return_stats.update(seen.reshape(-1))


def worker_setup(args, seeds):
    """A worker's generators, envs and local model, each env's first observation, core state and discounted return."""
    worker_seed, *env_seeds = seeds
    torch.manual_seed(worker_seed)
    rng = np.random.default_rng(worker_seed)
    envs = [make_env(args.env, seed, frame_stack=args.frame_stack) for seed in env_seeds]
    obs = observation_batch([env.reset(seed=seed)[0] for env, seed in zip(envs, env_seeds)])
    model = new_model(env_spaces(envs[0]), args)
    return envs, model, obs, model.initial_core_state(len(envs)).numpy(), np.zeros(len(envs)), rng


def gradient_worker(rank, args, seeds, shared_model, optimizer, step_counter):
    """Alg. S3's actor-learner thread, as a process; one pass of the loop is one of its updates:
      dtheta <- 0; theta' = theta         hogwild_update's zero_grad; local_model.load_state_dict (below)
      act until terminal s_t or t_max     collect_rollouts, t_max = --n-steps (an episode's end closes a rollout)
      R = 0 or V(s_t); R <- r_i + gamma R rollout_loss, through n_step_returns (or GAE, --gae-lambda < 1)
      dtheta += grad log pi (R - V), ...  a3c_loss (a mean over the steps), then loss.backward()
      asynchronous update of theta        hogwild_update: the shared .grad, SharedAdam.step(), no lock
      T <- T + 1 for each step            step_counter, the run's StepCounter (section 9), which sets the rate
    Alg. S3 is --envs-per-worker 1; with the default 4, an update covers a rollout of each of 4 envs, of unequal
    lengths where an episode ended. Yields (steps, (rank, the episodes that ended, the update's statistics))."""
    envs, local_model, obs, core_state, discounted, rng = worker_setup(args, seeds)
    buffer = RolloutBuffer.allocate(local_model, args.n_steps, len(envs))
    while True:
        local_model.load_state_dict(shared_model.state_dict())  # theta' = theta (and the running statistics)
        rollouts = collect_rollouts(envs, local_model, obs, core_state, buffer, rng)
        loss, update = rollout_loss(local_model, [(buffer, rollouts)], args.gamma, args.value_coef,
                                    args.entropy_coef, args.reward_scale, args.gae_lambda)
        update["learning_rate"] = set_learning_rate(optimizer, args, step_counter.total())
        update["grad_norm"] = hogwild_update(local_model, shared_model, optimizer, loss, args.max_grad_norm)
        update_statistics(shared_model, buffer, rollouts, discounted, args.gamma)
        yield args.n_steps * len(envs), (rank, [r.episode for r in rollouts if r.episode is not None], update)


def data_worker(rank, args, seeds, shared_model, policy_version, buffers, free_buffers):
    """Data mode's actor: with a fresh copy of the shared weights, fill one of its shared RolloutBuffers.
    Yields (steps, (rank, which buffer, the policy version that acted, its Rollouts)) for the learner."""
    envs, local_model, obs, core_state, discounted, rng = worker_setup(args, seeds)
    for index in itertools.cycle(range(len(buffers))):  # in turn, the order in which the learner frees them
        # none free: wait, so that a slow learner holds the workers back rather than let policy lag pile up
        while not free_buffers.acquire(timeout=0.1):
            yield 0, None
        version = policy_version.value  # read first: the weights copied next are at least this new
        local_model.load_state_dict(shared_model.state_dict())
        rollouts = collect_rollouts(envs, local_model, obs, core_state, buffers[index], rng)
        update_statistics(shared_model, buffers[index], rollouts, discounted, args.gamma)
        yield args.n_steps * len(envs), (rank, index, version, rollouts)


# --- 8. Learner (data mode) ------------------------------------------------------------------------

def buffers_per_worker(args):
    """A batch's buffers are held until learned from: one more per worker lets each act meanwhile."""
    return math.ceil((args.batch_buffers or args.workers) / args.workers) + 1


class Learner:
    """Data mode's single writer of the weights, in the main process: it owns the shared RolloutBuffers, a semaphore
    per worker counting its free ones and the policy version, and learns once --batch-buffers messages have come."""

    def __init__(self, args, shared_model, ctx, step_counter):
        self.args, self.shared_model, self.step_counter = args, shared_model, step_counter
        self.optimizer = torch.optim.Adam(shared_model.parameters(), lr=args.lr, fused=True)
        self.version = ctx.Value("q", 0, lock=False)  # written by the learner alone
        self.batch_size = args.batch_buffers or args.workers
        per_worker = buffers_per_worker(args)
        self.buffers = [[RolloutBuffer.allocate(shared_model, args.n_steps, args.envs_per_worker, shared=True)
                         for _ in range(per_worker)] for _ in range(args.workers)]
        self.free_buffers = [ctx.Semaphore(per_worker) for _ in range(args.workers)]
        self.batch = []  # messages (rank, index, version, rollouts) not learned from yet

    def receive(self, message):
        """Take a worker's message; once --batch-buffers have come, one gradient step on them under the current
        weights, and their buffers go back to the workers: returns the update's statistics, else None. No off-policy
        correction: actions from weights a few updates old count as on-policy (V-trace would fix it)."""
        self.batch.append(message)
        if len(self.batch) < self.batch_size:
            return None
        args = self.args
        batch = [(self.buffers[rank][index], rollouts) for rank, index, _, rollouts in self.batch]
        loss, update = rollout_loss(self.shared_model, batch, args.gamma, args.value_coef, args.entropy_coef,
                                    args.reward_scale, args.gae_lambda)
        update["learning_rate"] = set_learning_rate(self.optimizer, args, self.step_counter.total())
        self.optimizer.zero_grad()
        loss.backward()
        update["grad_norm"] = nn.utils.clip_grad_norm_(self.shared_model.parameters(), args.max_grad_norm).item()
        self.optimizer.step()
        update["policy_lag"] = sum(self.version.value - version for _, _, version, _ in self.batch) / len(self.batch)
        self.version.value += 1
        for rank, *_ in self.batch:  # learned from: the worker may overwrite it
            self.free_buffers[rank].release()
        self.batch = []
        return update


# --- 9. Processes: start, signals, liveness, stop -------------------------------------------------

def keep_freed_memory():
    """Ask glibc to keep the memory torch frees for reuse: each update allocates and frees the same large
    temporaries, which glibc would otherwise unmap and map again as fresh zeroed pages. Linux only."""
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap,
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: and up to 1 GB of freed heap stays with the process


def shared_memory_free():
    """Bytes free in /dev/shm, where torch's shared tensors live on Linux, or None where there is none."""
    with contextlib.suppress(OSError):
        stat = os.statvfs("/dev/shm")
        return stat.f_bavail * stat.f_frsize
    return None


def require_shared_memory(needed):
    """Refuse rollout buffers the shared-memory file system cannot hold, before any process starts: torch
    would fail halfway with a traceback. A container's is often small (Docker's default: 64 MB)."""
    free = shared_memory_free()
    require(free is None or needed <= free, f"data mode's rollout buffers need {needed / 2**20:.1f} MiB of shared "
            f"memory and /dev/shm has {(free or 0) / 2**20:.1f} MiB free: lower --workers, --envs-per-worker "
            f"or --n-steps, or enlarge /dev/shm (docker run --shm-size)")


DIVERGED = 3  # a worker's exit code when its loss stopped being finite


class StepCounter:
    """The run's env steps: the checkpoint's it resumed from, plus a slot per worker. No lock: each slot has one
    writer, and a worker killed while holding a lock would leave it locked, hanging whoever reads it next."""

    def __init__(self, ctx, workers, start=0):
        self.start, self.slots = start, ctx.Array("q", workers, lock=False)

    def add(self, rank, steps):
        self.slots[rank] += steps

    def total(self):
        return self.start + sum(self.slots)


def worker_process(rank, worker, args, seeds, worker_args, step_counter, messages, stop_event, parent_pid):
    """Every worker process: a mode's worker generator, its steps counted and its messages queued, until the stop
    event or its parent's death. One thread (threads of one worker slow the others down); signals left to the
    main process; exit code DIVERGED with one line for a non-finite loss, 1 and the traceback for other errors."""
    torch.set_num_threads(1)
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, which fork copies
    try:
        for taken, message in worker(rank, args, seeds, *worker_args):
            step_counter.add(rank, taken)
            if message is not None:
                messages.put(message)
            # a worker whose parent died, even by SIGKILL, is re-parented: it stops rather than run on as an orphan
            if stop_event.is_set() or os.getppid() != parent_pid:
                break
    except FloatingPointError as e:
        print(f"worker {rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(DIVERGED)
    except Exception:
        print(f"worker {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        messages.cancel_join_thread()  # never blocked at exit on messages that nobody will read any more


class Stop(Exception):
    """Ends training early, with main()'s exit code; save=False after divergence keeps the last good checkpoint."""

    def __init__(self, message, exit_code, save=True):
        super().__init__(message)
        self.exit_code, self.save = exit_code, save


class StopSignals:
    """SIGINT and SIGTERM while training: the handler only notes the signal and the loop acts on it
    (raise_if_received), at least every 0.1 s. Raised at once, it could land halfway through reading a message
    and break the clean-up that drains the queue; a second signal during the clean-up is noted too, and cannot cut
    it short."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def note(self, signum, frame):
        self.received = signum

    def raise_if_received(self):
        if self.received is not None:  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
            raise Stop(f"stopped by {signal.Signals(self.received).name}", 128 + self.received)

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def run_seeds(seed, first_step, workers, envs_per_worker):
    """[worker seed, its envs' seeds] for each worker, drawn from the run's seed by numpy's SeedSequence, so that no
    two streams of a run, nor of runs with different seeds, are the same (with seed + i, worker i of run s would be
    worker 0 of run s + i). A resumed run (first_step > 0) draws new ones, not those its first part began with."""
    workers_sequences = np.random.SeedSequence([seed, first_step]).spawn(workers)
    return [[int(child.generate_state(1, np.uint64)[0]) for child in worker.spawn(1 + envs_per_worker)]
            for worker in workers_sequences]


class Workers:
    """A run's worker processes and what they share with the main process: the StepCounter, the queue of their
    messages and the stop event."""

    def __init__(self, ctx, args, worker, worker_args, step_counter):
        """worker_args[rank]: what worker `rank` takes after its rank, args and seeds."""
        self.messages = ctx.Queue()
        self.stop_event = ctx.Event()
        seeds = run_seeds(args.seed, step_counter.start, args.workers, args.envs_per_worker)
        self.processes = [ctx.Process(target=worker_process, daemon=True, args=(
            rank, worker, args, seeds[rank], worker_args[rank], step_counter, self.messages, self.stop_event,
            os.getpid())) for rank in range(args.workers)]

    def start(self):
        for process in self.processes:
            process.start()

    def next_message(self, timeout):
        """The next message, or None after timeout seconds; first, Stop if a worker has ended badly (checked
        every time: the other workers' messages keep coming)."""
        for rank, process in enumerate(self.processes):
            if process.exitcode == DIVERGED:
                raise Stop(f"worker {rank}: training diverged", 1, save=False)
            if process.exitcode is not None and process.exitcode < 0:
                raise Stop(f"worker {rank} was killed by {signal.Signals(-process.exitcode).name}", 1)
            if process.exitcode not in (None, 0):
                raise Stop(f"worker {rank} failed with exit code {process.exitcode} (its traceback is above)", 1)
        with contextlib.suppress(queue.Empty):
            return self.messages.get(timeout=timeout)
        return None

    def stop(self):
        self.stop_event.set()
        stop_processes(self.processes, [self.messages])


def stop_processes(processes, queues):
    """Stop every worker, whatever state the queues are in: never hang, never leave one behind."""
    processes = [p for p in processes if p.pid is not None]  # a stop can come before all have started
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        for q in queues:  # a child blocked on a full queue, or flushing one, exits once it is drained
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
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


# --- 10. Checkpoints --------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "a3c.py checkpoint v5"  # a new layout gets a new tag, never one used before


class CheckpointError(Exception):
    """A checkpoint that could not be written (a full disk, say): the file at the path is left as it was."""


def save_checkpoint(path, model, optimizer, args, steps, episodes, recent_returns):
    """Write everything --eval and --resume need, atomically: a failed or cut write leaves the old file whole.
    Returns False, writing nothing, when a weight is not finite; raises CheckpointError when it cannot write."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return False
    checkpoint = {"format": CHECKPOINT_FORMAT, "env": args.env, **model.config, "model": model.state_dict(),
                  "optimizer": optimizer.state_dict(), "args": vars(args), "steps": steps, "episodes": episodes,
                  "recent_returns": list(recent_returns)}
    tmp = f"{path}.tmp"  # in the same folder, so os.replace is a rename within one file system
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # open() may have failed before creating it
            os.unlink(tmp)
        cause = e if isinstance(e, OSError) else e.__context__  # torch may raise a RuntimeError on top of it
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}") from None
        raise
    return True


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint, or raise UsageError saying what is wrong with it."""
    require(os.path.isfile(path), f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, weights_only=True)  # weights_only: loading runs no pickled code
    except Exception as e:
        raise UsageError(f"checkpoint {path}: not readable as an a3c.py checkpoint ({type(e).__name__})")
    tag = checkpoint.get("format", "") if isinstance(checkpoint, dict) else ""
    require(tag.startswith("a3c.py checkpoint "), f"checkpoint {path}: not an a3c.py checkpoint")
    require(tag == CHECKPOINT_FORMAT, f"checkpoint {path}: format {tag.split()[-1]}, and this a3c.py builds and reads "
            f"{CHECKPOINT_FORMAT.split()[-1]} only: train it again")
    return checkpoint


def checkpoint_spaces(checkpoint):
    """What the checkpoint's model was built for, as env_spaces gives it for an env."""
    return {key: checkpoint[key] for key in ("obs_size", "n_actions", "continuous")}


# --- 11. Monitor and training loop -----------------------------------------------------------------

UPDATE_TAGS = {"policy_loss": "update/policy_loss", "value_loss": "update/value_loss", "entropy": "update/entropy",
               "explained_variance": "update/explained_variance", "grad_norm": "update/grad_norm",
               "learning_rate": "update/learning_rate", "policy_lag": "data_mode/policy_lag"}  # TensorBoard tags


def reached(recent_returns, target_return):
    """The stop rule of --target-return: the mean of the last 100 episodes reaches it."""
    return len(recent_returns) >= 100 and sum(recent_returns) / len(recent_returns) >= target_return


class Monitor:
    """Episode statistics, progress lines, the episode CSV, TensorBoard and the stop criteria, in both modes; the
    main process alone writes the CSV and the event files."""

    def __init__(self, args, checkpoint=None):
        self.args = args
        self.recent = deque(checkpoint["recent_returns"] if checkpoint else (), maxlen=100)
        self.episodes = checkpoint["episodes"] if checkpoint else 0
        self.start_steps = self.last_steps = checkpoint["steps"] if checkpoint else 0
        self.start = self.last_print = time.perf_counter()
        self.updates = {name: [] for name in UPDATE_TAGS}  # each statistic's values since the last line
        self.writer = None  # opened by open_tensorboard, once the workers run
        self.csv_file = open(args.log_csv, "a", newline="") if args.log_csv else None
        if self.csv_file is not None:
            self.csv = csv.writer(self.csv_file)
            if self.csv_file.tell() == 0:
                self.csv.writerow(["wall_time", "steps", "worker", "return", "length"])

    def open_tensorboard(self):
        """Start the event-file writer, after the workers (it runs a thread, which fork would not copy), and
        record the run's flags as a table."""
        from torch.utils.tensorboard import SummaryWriter  # optional: prepare() checked that it imports
        self.writer = SummaryWriter(self.args.tensorboard)
        flags = "\n".join(f"| --{name.replace('_', '-')} | {value} |" for name, value in vars(self.args).items())
        self.writer.add_text("flags", "| flag | value |\n| --- | --- |\n" + flags)

    def add_episode(self, rank, episode_return, length, steps):
        self.episodes += 1
        self.recent.append(episode_return)
        if self.csv_file is not None:
            self.csv.writerow([f"{time.time():.3f}", steps, rank, episode_return, length])
            self.csv_file.flush()  # a learning curve can be plotted while training runs
        if self.writer is not None:
            self.writer.add_scalar("episode/return", episode_return, steps)
            self.writer.add_scalar("episode/length", length, steps)

    def add_update(self, update):
        """One update's statistics; the finite ones are averaged at the next progress line (explained variance is
        nan for returns that do not vary)."""
        for name, value in update.items():
            if math.isfinite(value):
                self.updates[name].append(value)

    def mean_return(self):
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def solved(self):
        return reached(self.recent, self.args.target_return)

    def done(self, steps):
        return (self.solved() or (self.args.max_episodes is not None and self.episodes >= self.args.max_episodes)
                or (self.args.max_steps is not None and steps >= self.args.max_steps))

    def progress(self, steps, force=False):
        """Every --log-interval seconds, one line and one TensorBoard point per statistic: means since the last."""
        now = time.perf_counter()
        if not force and now - self.last_print < self.args.log_interval:
            return
        elapsed = now - self.start
        means = {name: sum(values) / len(values) for name, values in self.updates.items() if values}
        line = (f"episodes={self.episodes} steps={steps} steps_per_second={(steps - self.start_steps) / elapsed:.0f} "
                f"mean_return={self.mean_return():.1f} seconds={elapsed:.1f}")
        if "entropy" in means:  # a collapsing entropy or a critic that fits nothing shows here first
            line += (f" entropy={means['entropy']:.3f}"
                     f" explained_variance={means.get('explained_variance', math.nan):.2f}")
        if "policy_lag" in means:
            line += f" mean_lag={means['policy_lag']:.2f}"
        print(line, flush=True)
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(UPDATE_TAGS[name], value, steps)
            if now > self.last_print:
                self.writer.add_scalar("speed/steps_per_second", (steps - self.last_steps) / (now - self.last_print),
                                       steps)
        self.last_print, self.last_steps = now, steps
        self.updates = {name: [] for name in UPDATE_TAGS}

    def summary(self, steps):
        elapsed = time.perf_counter() - self.start
        return {"solved": self.solved(), "episodes": self.episodes, "steps": steps, "seconds": elapsed,
                "steps_per_second": (steps - self.start_steps) / elapsed, "mean_return": self.mean_return()}

    def close(self):
        for output in (self.csv_file, self.writer):
            if output is not None:
                output.close()


def updates_applied(optimizer):
    """How many updates an Adam has applied: its step count, the first parameter's (0 before its first step).
    Hogwild workers may lose an increment to a race now and then, never every one."""
    state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
    return int(state["step"]) if "step" in state else 0


def train(args, checkpoint=None):
    """Train until solved, a budget runs out or a stop; returns a summary dict with the exit code. The main process
    runs the monitor and, in data mode, the learner: a checkpoint is a plain save from here."""
    torch.set_num_threads(1)
    keep_freed_memory()  # for the learner, in data mode
    torch.manual_seed(args.seed)
    env = make_env(args.env, frame_stack=args.frame_stack)
    shared_model = new_model(env_spaces(env), args)
    env.close()
    shared_model.share_memory()
    # fork on Linux (a worker starts with torch imported; safe, as this process has no thread yet when the workers
    # start), spawn elsewhere: chosen explicitly, since Python 3.14 made forkserver Linux's default
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    step_counter = StepCounter(ctx, args.workers, start=checkpoint["steps"] if checkpoint else 0)
    if args.mode == "gradient":  # the workers learn, each through the shared Adam
        optimizer = SharedAdam(shared_model.parameters(), lr=args.lr, fused=True)  # fused: one kernel for all
        worker, worker_args = gradient_worker, [(shared_model, optimizer, step_counter)] * args.workers
    else:  # the workers act, and the learner, here, learns from their rollouts
        learner = Learner(args, shared_model, ctx, step_counter)
        optimizer, worker = learner.optimizer, data_worker
        worker_args = [(shared_model, learner.version, learner.buffers[rank], learner.free_buffers[rank])
                       for rank in range(args.workers)]
    if checkpoint is not None:
        shared_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])  # the rate is set again at every update
    monitor = Monitor(args, checkpoint)
    workers = Workers(ctx, args, worker, worker_args, step_counter)
    updates_before = updates_applied(optimizer)

    def save():
        """The checkpoint, only once the run has learned: before its first update, the file at --save (perhaps
        another run's) is left as it was. Returns whether it was written; raises CheckpointError."""
        return updates_applied(optimizer) > updates_before and save_checkpoint(
            args.save, shared_model, optimizer, args, step_counter.total(), monitor.episodes, monitor.recent)

    exit_code, message, save_at_end = 0, None, True
    with StopSignals() as signals:
        try:
            workers.start()
            if args.tensorboard is not None:
                monitor.open_tensorboard()
            last_save = time.monotonic()
            while not monitor.done(step_counter.total()):
                signals.raise_if_received()
                received = workers.next_message(timeout=0.1)
                if received is not None:
                    if args.mode == "gradient":
                        rank, episodes, update = received
                    else:
                        rank, rollouts = received[0], received[3]
                        episodes = [r.episode for r in rollouts if r.episode is not None]
                        update = learner.receive(received)  # the update's statistics, once a batch is full
                    for episode in episodes:
                        monitor.add_episode(rank, *episode, step_counter.total())
                    if update is not None:
                        monitor.add_update(update)
                if time.monotonic() - last_save >= args.save_every:
                    try:
                        save()
                    except CheckpointError as e:  # mid-run: say so, and go on
                        print(f"a3c.py: {e}; training goes on", file=sys.stderr, flush=True)
                    last_save = time.monotonic()
                monitor.progress(step_counter.total())
        except Stop as stop:
            exit_code, message, save_at_end = stop.exit_code, str(stop), stop.save
        except FloatingPointError as error:  # the learner's loss, in data mode
            exit_code, message, save_at_end = 1, str(error), False
        finally:
            workers.stop()
            try:
                saved = save_at_end and save()
            except CheckpointError as e:  # at the end: the result line is still printed, with exit code 1
                print(f"a3c.py: {e}", file=sys.stderr, flush=True)
                saved, exit_code = False, exit_code or 1
            monitor.progress(step_counter.total(), force=True)
            monitor.close()
    return {**monitor.summary(step_counter.total()), "exit_code": exit_code, "message": message, "saved": saved,
            "learned": updates_applied(optimizer) > updates_before}


# --- 12. Evaluation --------------------------------------------------------------------------------

def plays_one_game(env):
    """An emulator that replays the same game from every reset, whatever its seed: ALE without sticky actions or
    random frame skips (the NoFrameskip ids). Other envs differ from episode to episode through their seed."""
    kwargs = env.spec.kwargs
    return (str(env.spec.entry_point).startswith("ale_py") and kwargs.get("repeat_action_probability") == 0
            and isinstance(kwargs.get("frameskip"), int))


def evaluate(args, checkpoint):
    """Play --episodes episodes with the checkpoint's most probable action; returns a summary dict. Where a seed
    alone would replay one game, each episode starts with 1-30 no-op actions, as the DQN and A3C papers evaluate."""
    torch.set_num_threads(1)
    try:
        render_mode = "human" if args.render else "rgb_array" if args.video else None
        env = make_env(args.env, args.seed, render_mode=render_mode, frame_stack=args.frame_stack)
        env.reset(seed=args.seed)  # a human window opens here, so a missing pygame shows up here
    except gym.error.Error as e:
        raise UsageError(f"environment {args.env!r}: {e}")
    if args.video:  # the screen as a person sees it (in colour, full size), one file per episode
        with warnings.catch_warnings():  # prepare() created the folder: RecordVideo would warn that it exists
            warnings.simplefilter("ignore")
            env = gym.wrappers.RecordVideo(env, args.video, episode_trigger=lambda episode: True, name_prefix="eval")
    model = new_model(checkpoint_spaces(checkpoint), args)  # prepare() took the flags that shape it from it
    model.load_state_dict(checkpoint["model"])
    returns, steps, start = [], 0, time.perf_counter()
    max_noops, rng = (30 if plays_one_game(env) else 0), np.random.default_rng(args.seed)
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        for _ in range(rng.integers(1, max_noops + 1) if max_noops else 0):
            obs, _, terminated, truncated, _ = env.step(0)  # ALE's action 0 is NOOP
            if terminated or truncated:
                obs, _ = env.reset()
        core_state, done = model.initial_core_state(1), False  # carried through the episode
        while not done:
            with torch.inference_mode():  # the most probable action: argmax, or the Gaussian's mean
                head_out, _, core_state = model(torch.from_numpy(observation_batch([obs])), core_state)
            obs, _, terminated, truncated, info = env.step(model.policy.most_probable(head_out.numpy())[0])
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
        steps += int(info["episode"]["l"])
        print(f"episode {episode + 1}: return={returns[-1]:.1f} length={int(info['episode']['l'])}", flush=True)
    env.close()  # RecordVideo writes the last episode's file here
    if args.video:
        print(f"videos: {os.path.join(args.video, 'eval-episode-<i>.mp4')}, i = 0 .. {args.episodes - 1}",
              flush=True)
    seconds = time.perf_counter() - start
    mean_return = sum(returns) / len(returns)
    solved = args.target_return is not None and mean_return >= args.target_return
    return {"solved": solved, "episodes": len(returns), "steps": steps, "seconds": seconds,
            "steps_per_second": steps / seconds, "mean_return": mean_return, "exit_code": 0, "message": None}


# --- 13. Entry point -------------------------------------------------------------------------------

def need_package(module, flag, package):
    """An optional package, imported only when its flag is used."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs the {package} package: pip install {package}")


def make_folder(flag, folder):
    """Create an output folder now, so that a path that cannot be one is a usage error, not a late crash."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot create it ({e.strerror})")
    require(os.access(folder, os.W_OK), f"{flag} {folder}: cannot write in it")


RUN_FLAGS = ("resume", "eval", "episodes", "render", "video", "save")  # what a command does, not what it trains


def resume_flags(argv, path, checkpoint):
    """A resumed run's flags: every training flag of the run the checkpoint saved is the default, a flag given
    again wins, and the run keeps saving to the checkpoint it resumed from unless --save is given. Returns them
    and the line that says which flags came from the checkpoint and which were given."""
    parser_defaults = vars(parse_args([]))
    # frame_stack: prepare() reads it off the model's input (a run of vectors saved an unused 4); a flag the saved
    # run left unset (None) keeps today's default
    saved = {name: value for name, value in checkpoint["args"].items()
             if name in parser_defaults and name not in (*RUN_FLAGS, "frame_stack") and value is not None}
    # numbers as text, so that argparse checks them as it checks a typed flag: an older a3c.py had other ranges
    as_typed = {name: str(value) if type(value) in (int, float) else value for name, value in saved.items()}
    args = parse_args(argv, defaults={**as_typed, "save": path})
    resumed_defaults = {**parser_defaults, **saved, "save": path}

    def flag(name):
        value = getattr(args, name)
        return f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
    from_checkpoint = [flag(name) for name in saved if getattr(args, name) == saved[name] != parser_defaults[name]]
    given = [flag(name) for name, value in vars(args).items()
             if name != "resume" and value != resumed_defaults[name]]
    return args, (f"a3c.py: resuming {path} at step {checkpoint['steps']}; from the checkpoint: "
                  f"{' '.join(from_checkpoint)}; given: {' '.join(given) or 'none'}")


def prepare(args, checkpoint=None):
    """Check every input before a process starts, and fill in the defaults that depend on the env or on the
    checkpoint that --eval or --resume names (--env, --hidden, the MODEL_FLAGS, --frame-stack, --reward-scale,
    --target-return)."""
    path = args.eval or args.resume
    if checkpoint is not None:  # the model's shape is the checkpoint's: a flag may repeat it, not change it
        shape = {"env": checkpoint["env"], "hidden": checkpoint["hidden"]}
        if not isinstance(checkpoint["obs_size"], int):  # frames: the stack's depth is the model's input width
            shape["frame_stack"] = checkpoint["obs_size"][0]
        for name, value in shape.items():
            require(getattr(args, name) in (None, value),
                    f"checkpoint {path} has --{name.replace('_', '-')} {value}, not {getattr(args, name)}")
            setattr(args, name, value)
        for flag in MODEL_FLAGS:  # on/off: a flag cannot add to a trained model what it was trained without
            require(checkpoint[flag] or not getattr(args, flag),
                    f"checkpoint {path} was trained without --{flag.replace('_', '-')}")
            setattr(args, flag, checkpoint[flag])
    require(not (args.lstm and args.separate_critic),
            "--lstm and --separate-critic exclude each other: the critic's own torso would have no memory")
    args.env = args.env or "CartPole-v1"
    frame_stack_given, args.frame_stack = args.frame_stack is not None, args.frame_stack or 4
    try:
        env = make_env(args.env, frame_stack=args.frame_stack)
    except gym.error.Error as e:  # an unknown id: gymnasium suggests close ones
        raise UsageError(f"environment {args.env!r}: {e}")
    except ValueError as e:
        raise UsageError(f"environment {e}")
    spaces, render_modes, threshold = env_spaces(env), env.metadata.get("render_modes", []), env.spec.reward_threshold
    env.close()
    vectors = isinstance(spaces["obs_size"], int)
    require(vectors or not args.normalize_obs,
            f"--normalize-obs: {args.env}'s observations are frames, which the network scales by 255")
    require(not (vectors and frame_stack_given), f"--frame-stack: {args.env}'s observations are vectors, not frames")
    args.hidden = args.hidden or (64 if vectors else 256)
    if args.mode == "data" and not args.eval:  # the learner's rollout buffers, which live in shared memory
        one = sum(field.nbytes for field in RolloutBuffer.allocate(new_model(spaces, args), args.n_steps,
                                                                   args.envs_per_worker))
        require_shared_memory(one * buffers_per_worker(args) * args.workers)
    args.reward_scale = args.reward_scale or (1.0 if args.normalize_reward else 0.1)
    args.target_return = threshold if args.target_return is None else args.target_return
    require(checkpoint is None or spaces == checkpoint_spaces(checkpoint),
            f"checkpoint {path} does not fit {args.env}'s observation and action spaces")
    require(args.target_return is not None or args.eval, f"{args.env} has no reward_threshold: give --target-return")
    if args.resume:  # a run that would stop before its first update
        require(args.max_steps is None or args.max_steps > checkpoint["steps"], f"checkpoint {path} has taken "
                f"{checkpoint['steps']} steps, --max-steps {args.max_steps}: give a larger --max-steps")
        require(args.max_episodes is None or args.max_episodes > checkpoint["episodes"], f"checkpoint {path} has "
                f"played {checkpoint['episodes']} episodes, --max-episodes {args.max_episodes}: give a larger one")
        require(not reached(checkpoint["recent_returns"], args.target_return), f"checkpoint {path} has reached "
                f"--target-return {args.target_return} already: give a higher one")
    if args.tensorboard is not None and not args.eval:
        need_package("torch.utils.tensorboard", "--tensorboard", "tensorboard")
        make_folder("--tensorboard", args.tensorboard)
    if args.video is not None:
        require(args.eval, "--video records --eval episodes: give --eval PATH too")
        require(not args.render, "--video and --render exclude each other")
        require("rgb_array" in render_modes, f"--video: {args.env} cannot render its screen as an image")
        need_package("moviepy", "--video", "moviepy")  # gymnasium's RecordVideo needs it
        make_folder("--video", args.video)
    for flag, out in [("--save", args.save), ("--log-csv", args.log_csv)]:
        folder = os.path.dirname(os.path.abspath(out)) if out and not args.eval else None
        require(not folder or os.access(folder, os.W_OK), f"{flag} {out}: cannot write in {folder}")


def main(argv=None):
    try:
        args = parse_args(argv)
        require(not (args.eval and args.resume), "--eval and --resume exclude each other")
        checkpoint = load_checkpoint(args.eval or args.resume) if args.eval or args.resume else None
        if args.resume:
            args, resumed = resume_flags(argv, args.resume, checkpoint)
        prepare(args, checkpoint)
        if args.resume:
            print(resumed, flush=True)
        summary = evaluate(args, checkpoint) if args.eval else train(args, checkpoint)
    except UsageError as e:
        print(f"a3c.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or during --eval (training turns it into a Stop)
        print("a3c.py: interrupted", file=sys.stderr)
        return 130
    kept = None if args.eval else (f"checkpoint saved to {args.save}" if summary["saved"] else
                                   f"no update was made, so {args.save} was left as it was" if not summary["learned"]
                                   else f"{args.save} keeps the last good checkpoint, if any")
    if summary["message"] or not (args.eval or summary["learned"]):
        print(f"a3c.py: {'; '.join(filter(None, [summary['message'], kept]))}", file=sys.stderr, flush=True)
    print("result: solved={} episodes={} steps={} seconds={:.1f} steps_per_second={:.0f} mean_return={:.1f}".format(
        "yes" if summary["solved"] else "no", summary["episodes"], summary["steps"], summary["seconds"],
        summary["steps_per_second"], summary["mean_return"]), flush=True)
    return summary["exit_code"]


if __name__ == "__main__":
    exit_code = main()
    # Every file is closed and every worker joined: skip Python's teardown, most of a second spent freeing the
    # modules torch's compiler imported with the first optimizer
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
