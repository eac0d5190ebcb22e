"""Asynchronous Advantage Actor-Critic (A3C) in one file, for PyTorch and Gymnasium on the CPU.

Two ways to run the workers in parallel:
  --mode gradient  every worker acts, computes the gradient of its own rollouts and applies it to the
                   shared model through a shared-state Adam, without locks (Hogwild, as in the paper).
  --mode data      workers only act and send their rollouts to one learner, the main process, which
                   batches them, computes the gradient and publishes the new weights.
Each worker steps --envs-per-worker environments together (one forward pass chooses all their actions);
with 1 it is the paper's one-environment actor-learner. One worker stepping N envs in lockstep, with one
batched update and no asynchrony, is A2C. Only --workers 1 --mode gradient is reproducible. Discrete
actions get a softmax policy, Box actions a Gaussian one: the action space picks the head; vectors get an
MLP torso, images (Atari) stacked frames and a conv torso: the observation picks the torso; --lstm puts a
recurrent core between the two (A3C LSTM). Nothing else branches on any of these, and the mode is picked
once, in train() (Hogwild or Learner).

Sections in the order the data flows: flags, env, network, optimizer, rollouts, returns and loss, workers,
learner; then how processes are run, checkpoints, the monitor and train(), evaluation, main().

    python a3c.py --workers 4 --mode gradient
    python a3c.py --workers 2 --mode data --seed 1
    python a3c.py --env Pendulum-v1 --target-return -200 --workers 2 --gamma 0.95 --lr 0.001

References: Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning", arXiv:1602.01783
(Algorithm S3); Recht et al. 2011, "Hogwild!", arXiv:1106.5730; Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation", arXiv:1506.02438 (--gae-lambda).
"""
import argparse
import contextlib
import ctypes
import csv
import difflib
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


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, but not the empty ones
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def number(kind, low=-math.inf, high=math.inf, low_open=True):
    """An argparse type: a finite int or float in (low, high] (or [low, high] with low_open=False)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if (value <= low if low_open else value < low) or value > high:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else \
                f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value
    return parse


def parse_args(argv=None):
    """Parse the command line; tests call parse_args([...]) with their own flags."""
    positive_int, positive, non_negative = number(int, 0), number(float, 0), number(float, 0, low_open=False)
    p = OneLineParser(prog="a3c.py", description=__doc__.split("\n")[0],
                      formatter_class=HelpFormatter)
    p.add_argument("--workers", type=positive_int, default=4, help="worker processes")
    p.add_argument("--mode", choices=["gradient", "data"], default="gradient",
                   help="gradient: Hogwild workers; data: workers act, one learner trains")
    p.add_argument("--env", type=str, default=None,
                   help="Gymnasium id: 1-D Box or uint8 image obs, Discrete or 1-D Box actions "
                        "(default: CartPole-v1, or the checkpoint's)")
    p.add_argument("--seed", type=number(int), default=0,
                   help="worker i seeds its generators with seed + i, its env k with seed + i + k * workers")
    p.add_argument("--lr", type=positive, default=2e-3, help="Adam learning rate")
    p.add_argument("--gamma", type=number(float, 0, 1), default=0.99, help="discount factor, in (0, 1]")
    p.add_argument("--n-steps", type=positive_int, default=10, help="steps in each env between two updates")
    p.add_argument("--envs-per-worker", type=positive_int, default=4,
                   help="envs each worker steps together, choosing their actions in one forward pass")
    p.add_argument("--entropy-coef", type=non_negative, default=0.01, help="weight of the entropy bonus")
    p.add_argument("--value-coef", type=non_negative, default=0.5, help="weight of the value loss")
    p.add_argument("--reward-scale", type=positive, default=None,
                   help="the critic learns the values of rewards times this, episode returns stay true "
                        "(default: 0.1, or 1 with --normalize-reward, which has scaled them already)")
    p.add_argument("--gae-lambda", type=number(float, 0, 1, low_open=False), default=1.0,
                   help="GAE's lambda, in [0, 1]: 1 gives the paper's n-step returns, 0 one-step TD targets")
    p.add_argument("--normalize-obs", action="store_true",
                   help="normalise vector observations by running statistics that every worker shares and a "
                        "checkpoint keeps (default: the checkpoint's)")
    p.add_argument("--normalize-reward", action="store_true",
                   help="divide rewards, for learning only, by a running standard deviation of the discounted "
                        "return, shared and kept like --normalize-obs's statistics (default: the checkpoint's)")
    p.add_argument("--log-std-init", type=number(float), default=0.0,
                   help="Box actions: the Gaussian's log standard deviation at the start (0: sigma = 1)")
    p.add_argument("--lstm", action="store_true",
                   help="A3C LSTM: an LSTM between the torso and the heads, its state carried from step to step "
                        "(default: the checkpoint's)")
    p.add_argument("--frame-stack", type=positive_int, default=None,
                   help="frames: how many of the last frames an observation holds (default: 4, or the checkpoint's)")
    p.add_argument("--separate-critic", action="store_true",
                   help="give the value head a torso of its own instead of sharing the policy's "
                        "(default: the checkpoint's)")
    p.add_argument("--max-grad-norm", type=positive, default=5.0, help="clip each update's gradient norm")
    p.add_argument("--hidden", type=positive_int, default=None,
                   help="width of the hidden layers (default: 64 for vectors, 256 for frames, or the checkpoint's)")
    p.add_argument("--batch-rollouts", type=positive_int, default=None,
                   help="data mode: worker rollouts per learner update (default: one per worker)")
    p.add_argument("--max-episodes", type=positive_int, default=None, help="stop after this many episodes")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many env steps")
    p.add_argument("--target-return", type=number(float), default=None,
                   help="stop when the mean return of the last 100 episodes reaches it "
                        "(default: the env's reward_threshold)")
    p.add_argument("--log-interval", type=positive, default=2.0, help="seconds between progress lines")
    p.add_argument("--log-csv", type=str, default=None, help="write one row per finished episode to this CSV")
    p.add_argument("--tensorboard", type=str, default=None, metavar="DIR",
                   help="write TensorBoard event files to DIR (needs: pip install tensorboard)")
    p.add_argument("--save", type=str, default="a3c_model.pth", help="checkpoint written during and after training")
    p.add_argument("--save-every", type=positive, default=60.0, help="seconds between checkpoints")
    p.add_argument("--resume", type=str, default=None, metavar="PATH", help="continue training from a checkpoint")
    p.add_argument("--eval", type=str, default=None, metavar="PATH",
                   help="play --episodes greedy episodes with a checkpoint's policy instead of training")
    p.add_argument("--episodes", type=positive_int, default=10, help="episodes to play with --eval")
    p.add_argument("--render", action="store_true", help="with --eval: show the env in a window")
    p.add_argument("--video", type=str, default=None, metavar="DIR",
                   help="with --eval: write one MP4 per episode to DIR (needs: pip install moviepy)")
    return p.parse_args(argv)


# --- 2. Environment --------------------------------------------------------------------------------

def make_env(env_id, seed=None, render_mode=None, frame_stack=4):
    """Build a Gymnasium env (5-tuple step) that reports each episode's true undiscounted return.

    The TimeLimit wrapper stays on: it is what tells a time-limit truncation from a real termination.
    RecordEpisodeStatistics puts the episode's return and length in info["episode"] when it ends.
    Box actions: the policy acts in [-1, 1] in every dimension and RescaleAction maps that box onto the
    env's bounds, so one Gaussian suits any bounds. A sample outside the box is clipped on its way into
    the env (ClipAction), while the rollout keeps the sampled action: the loss needs log pi of what the
    Gaussian drew, and the clipped value has no density under it (clipping in the loss would bias it).
    Image observations (uint8, H x W or H x W x C) get the standard preprocessing in pixels_to_frames.
    """
    if env_id.startswith("ALE/") or env_id not in gym.registry:  # Atari ids exist once ale-py registers them
        try:
            import ale_py
        except ImportError:
            if env_id.startswith("ALE/"):
                raise ValueError(f"{env_id}: Atari needs ale-py: pip install 'gymnasium[atari]'") from None
        else:
            gym.register_envs(ale_py)
    atari = env_id in gym.registry and str(gym.spec(env_id).entry_point).startswith("ale_py")
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
            raise ValueError(f"{env_id}: action space {action_space} has infinite bounds, which cannot be "
                             f"scaled to [-1, 1]")
        box = np.ones(action_space.shape, action_space.dtype)
        env = gym.wrappers.ClipAction(gym.wrappers.RescaleAction(env, -box, box))
    elif not isinstance(action_space, gym.spaces.Discrete):
        env.close()
        raise ValueError(f"{env_id}: action space {action_space} is neither Discrete nor a 1-D Box")
    if seed is not None:
        env.action_space.seed(seed)
    return env


def pixels_to_frames(env, frame_stack=4):
    """Grayscale, halve each side by averaging 2x2 blocks, stack the last frame_stack frames; clip rewards.

    As in DQN and A3C, but without OpenCV: ALE's 210x160 screen becomes 105x80, about as many pixels as
    the usual 84x84. Frames stay uint8 (4 times smaller than float32 in rollouts and messages) until
    the network divides them by 255. Rewards are clipped to [-1, 1] for learning only: the episode
    return reported comes from RecordEpisodeStatistics, inside these wrappers, so it is the game's score.
    ALE/*-v5 ids skip 4 frames themselves (frameskip=4); make_env adds the skip, with the max over the last two
    frames (objects that flicker show in one of them), to an env that declares frameskip=1.
    Four stacked frames show motion to a feed-forward network (Mnih et al. 2015); with --lstm one frame can
    do, since the recurrent state can remember the ones before.
    """
    height, width = env.observation_space.shape[0] // 2, env.observation_space.shape[1] // 2

    def downsample(pixels):
        if pixels.ndim == 3:  # colour: luminance (ITU-R 601)
            pixels = (pixels @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        # the mean of each 2x2 block, in integers: ndarray.mean's float path would cost more than the
        # ALE step itself
        pixels = pixels[:2 * height, :2 * width].astype(np.uint16)
        total = pixels[0::2, 0::2] + pixels[1::2, 0::2] + pixels[0::2, 1::2] + pixels[1::2, 1::2]
        return (total >> 2).astype(np.uint8)

    env = gym.wrappers.ClipReward(env, -1.0, 1.0)
    env = gym.wrappers.TransformObservation(env, downsample, gym.spaces.Box(0, 255, (height, width), np.uint8))
    return gym.wrappers.FrameStackObservation(env, frame_stack)


def observation_batch(observations):
    """Stack observations for the network: vectors become float32, frames stay uint8 until the network."""
    obs = np.stack(observations)
    return obs if obs.dtype == np.uint8 else obs.astype(np.float32)


def model_shape(env):
    """What ActorCritic needs to know of an env, as its keyword arguments obs_size, n_actions, continuous.

    obs_size is the length of a vector observation, or (channels, height, width) of stacked frames;
    n_actions is the number of choices for Discrete actions, the number of dimensions for Box actions.
    """
    space, shape = env.action_space, env.observation_space.shape
    continuous = isinstance(space, gym.spaces.Box)
    return {"obs_size": shape[0] if len(shape) == 1 else tuple(shape), "continuous": continuous,
            "n_actions": space.shape[0] if continuous else int(space.n)}


# --- 3. Network ------------------------------------------------------------------------------------

def categorical_log_prob_entropy(logits, actions):
    """log pi(a_t|s_t) and the entropy of pi(.|s_t) for a softmax policy.

    Args: logits [T, A], actions [T] int64. Returns: log_probs [T], entropy [T].
    """
    log_probs = torch.log_softmax(logits, dim=-1)  # [T, A]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(1, actions.unsqueeze(1)).squeeze(1), entropy


def gaussian_log_prob_entropy(mean, log_std, actions):
    """log pi(a_t|s_t) and the entropy of pi(.|s_t) for a diagonal Gaussian policy.

    Args: mean [T, D], log_std [D], actions [T, D] float32. Returns: log_probs [T], entropy [T].
    Per dimension, log N(a; mu, sigma) = -(a - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2 and
    H = log sigma + (1 + log(2 pi)) / 2; the dimensions are independent, so both sum over them.
    """
    log_probs = -0.5 * ((actions - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    entropy = (log_std + 0.5 * (1 + math.log(2 * math.pi))).sum(-1).expand(mean.shape[0])
    return log_probs.sum(-1), entropy


class CategoricalHead(nn.Module):
    """Discrete actions: one logit per action, pi(.|s) = softmax(logits)."""
    action_dtype = np.int64

    def __init__(self, hidden, n_actions):
        super().__init__()
        self.out = nn.Linear(hidden, n_actions)
        self.action_shape = ()

    def forward(self, h):
        return self.out(h)  # [B, A] logits

    def log_prob_entropy(self, logits, actions):
        return categorical_log_prob_entropy(logits, actions)

    def sample(self, logits, rng):
        """Gumbel-max trick: argmax(logits + Gumbel noise) is an exact sample from softmax(logits), and on
        small batches it costs far less than torch.distributions.Categorical or torch.multinomial."""
        return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)  # [K]

    def mode(self, logits):
        return np.argmax(logits, axis=1)


class GaussianHead(nn.Module):
    """Box actions, scaled to [-1, 1] by make_env: a ~ N(mean(s), sigma^2) in each dimension.

    The mean is tanh-bounded inside the box. Unbounded, it can drift outside (seen here on Pendulum:
    means near 8 for a box of 1), where every sample clips to the same action and the policy gradient no
    longer tells which way to go. log sigma is one free parameter per dimension rather than a head: the
    paper learns a variance per state, but a state-free sigma is trained by every sample, cannot collapse
    on rarely visited states, and is the choice that trains reliably in Stable-Baselines3 and CleanRL.
    """
    action_dtype = np.float32

    def __init__(self, hidden, action_dims, log_std_init=0.0):
        super().__init__()
        self.out = nn.Linear(hidden, action_dims)
        self.log_std = nn.Parameter(torch.full((action_dims,), float(log_std_init)))  # 0: sigma = 1 at the start
        self.action_shape = (action_dims,)

    def forward(self, h):
        return torch.tanh(self.out(h))  # [B, D] means, inside the box

    def log_prob_entropy(self, mean, actions):
        return gaussian_log_prob_entropy(mean, self.log_std, actions)

    def sample(self, mean, rng):
        std = np.exp(self.log_std.detach().numpy())  # [D]
        return (mean + std * rng.standard_normal(mean.shape)).astype(np.float32)  # [K, D], not clipped

    def mode(self, mean):
        return mean


class ConvTorso(nn.Module):
    """Stacked uint8 frames [B, C, H, W] -> features [B, hidden], with the A3C paper's feed-forward network
    (16 8x8 filters of stride 4, 32 4x4 of stride 2, one fully connected layer): cheap enough for a CPU."""

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
    """The feed-forward agent's core: the torso's features go straight to the heads, and there is no state
    to carry (its size is 0, so the same code carries it for both cores)."""
    state_size = 0

    def forward(self, features, state, lengths=None):
        return features, state


class LSTMCore(nn.Module):
    """--lstm: LSTM cells between the torso and the heads, as in the paper's A3C LSTM (Mnih et al. 2016: 256
    cells after the conv torso's last layer), so that the policy and the value can use what was seen before.

    The heads read the torso's features plus h (a skip connection around the cells). At the start h is
    small and, with every gate near one half, an even mix of the current frame and the ones before, so
    without the skip the agent first has to learn to see the present: on a task where only the current
    frame matters it learned 3-4 times more slowly than the feed-forward agent (README), and with it as fast,
    while a task that needs memory is still learned through h.

    Its state is h and c side by side in one tensor [n, 2 * hidden]. forward() runs n sequences of steps
    laid end to end (each env's rollout) in lockstep through time: a sequence that has ended keeps its last
    state while longer ones go on, so rollouts of unequal length are batched with one loop over time steps,
    not one over rollouts. Acting (one step of each env) and learning take the same step(), so with the
    same weights and the same starting state they give the same outputs.
    """

    def __init__(self, hidden):
        super().__init__()
        self.input_weights = nn.Linear(hidden, 4 * hidden)  # W x_t + b, for the four gates
        self.hidden_weights = nn.Linear(hidden, 4 * hidden, bias=False)  # U h_{t-1}
        self.state_size = 2 * hidden
        for layer in (self.input_weights, self.hidden_weights):
            nn.init.orthogonal_(layer.weight)
        nn.init.zeros_(self.input_weights.bias)

    def step(self, input_gates, h, c):
        """One LSTM step with a forget gate: [i, f, g, o] = W x_t + b + U h_{t-1};
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g); h_t = sigmoid(o) * tanh(c_t)."""
        i, f, g, o = (input_gates + self.hidden_weights(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, features, state, lengths=None):
        """features [N, hidden] of n sequences laid end to end, lengths [n] (summing to N, or None for n = N
        sequences of one step), state [n, 2 * hidden] before each one's first step
        -> (features + h [N, hidden] in the order of features, state [n, 2 * hidden] after each one's last step)."""
        h, c = state.chunk(2, dim=1)
        # W x_t + b of every step in one matrix product: only U h_{t-1} has to wait for the step before
        input_gates = self.input_weights(features)  # [N, 4 * hidden]
        if lengths is None:  # acting: one step of each env, nothing to pad
            h, c = self.step(input_gates, h, c)
            return features + h, torch.cat([h, c], dim=1)
        lengths = torch.as_tensor(lengths)
        valid = torch.arange(int(lengths.max())) < lengths[:, None]  # [n, steps]: step t of sequence i exists
        padded = input_gates.new_zeros(*valid.shape, input_gates.shape[1])
        padded[valid] = input_gates  # sequence-major, as the features come
        outputs = []
        for t in range(valid.shape[1]):
            h_next, c_next = self.step(padded[:, t], h, c)
            going = valid[:, t:t + 1]  # [n, 1]
            h, c = torch.where(going, h_next, h), torch.where(going, c_next, c)
            outputs.append(h)
        return features + torch.stack(outputs, 1)[valid], torch.cat([h, c], dim=1)


class RunningMeanStd(nn.Module):
    """The mean and variance of everything seen so far, per dimension, updated batch by batch.

    Kept in buffers, so that they live where the weights live: in shared memory once the model is shared
    (every worker updates and reads the same ones), and in state_dict (a checkpoint carries them). Workers
    update the shared model's statistics without a lock, as Hogwild writes the weights: two updates at the
    same moment may lose one or mix the two, which costs a running estimate a few samples; a lock would be
    taken by every worker on every update, and one killed while holding it would hang the others.
    """

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))

    def update(self, batch):
        """Fold in a batch [N, *shape] by the parallel formula of Chan et al. (1979); in place, so that a
        shared model's statistics change for every process."""
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
        """(x - mean) / std, clipped to [-clip, clip] as Stable-Baselines3's VecNormalize does: a rare state
        far outside what was seen cannot saturate the first layer."""
        return ((x - self.mean.float()) / self.std()).clamp(-clip, clip)


class ActorCritic(nn.Module):
    """A shared torso, a core, and a policy head and a value head V(s).

    Three choices, made here and nowhere else. The observation picks the torso: two tanh layers for a
    vector, ConvTorso for stacked frames. The lstm flag picks the core: NoCore, or LSTMCore and its
    recurrent state. The action space picks the policy head: logits for Discrete actions, a Gaussian's
    mean (and a learned sigma) for Box actions. Everything after this (sampling, the loss, both workers,
    the learner, evaluation) goes through the head's sample, mode and log_prob_entropy, and passes the
    core's state along, whatever its size (0 without an LSTM). Two flags add running statistics, kept
    here because they are part of the trained agent: normalize_obs, of vector observations (frames are
    already scaled by 255); normalize_reward, of the discounted return, whose standard deviation is the
    unit the critic's values are learned in.
    separate_critic gives the value head a torso of its own, so that the value loss does not pull on the
    policy's features (as in the paper's continuous agent, Stable-Baselines3 and CleanRL's MuJoCo scripts).
    """

    def __init__(self, obs_size, n_actions, hidden=64, continuous=False, normalize_obs=False,
                 normalize_reward=False, separate_critic=False, log_std_init=0.0, lstm=False):
        super().__init__()
        self.obs_size, self.hidden = obs_size, hidden
        self.obs_stats = RunningMeanStd((obs_size,)) if normalize_obs else None
        self.return_stats = RunningMeanStd() if normalize_reward else None

        def torso():
            if isinstance(obs_size, int):
                return nn.Sequential(nn.Linear(obs_size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
            return ConvTorso(obs_size, hidden)
        self.torso = torso()
        self.critic_torso = torso() if separate_critic else None
        self.core = LSTMCore(hidden) if lstm else NoCore()
        self.policy = GaussianHead(hidden, n_actions, log_std_init) if continuous else CategoricalHead(hidden, n_actions)
        self.value = nn.Linear(hidden, 1)
        # Orthogonal init; a tiny policy layer starts the policy near uniform (or the Gaussian near mean 0),
        # maximal exploration, and a unit-scale value head lets V(s) reach the scale of the returns quickly.
        torsos = [(layer, math.sqrt(2)) for part in (self.torso, self.critic_torso) if part is not None
                  for layer in part.modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]
        for layer, gain in torsos + [(self.policy.out, 0.01), (self.value, 1.0)]:
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
        # Conv weights in the channels-last (NHWC) layout, the one ConvTorso feeds them: oneDNN's CPU kernels
        # run faster in it, above all the first convolution's backward pass. No-op for an MLP.
        self.to(memory_format=torch.channels_last)

    def forward(self, obs, state=None, lengths=None):
        """obs [N, obs_size] float32 or [N, C, H, W] uint8: the steps of n sequences laid end to end, lengths
        [n] (None: each observation a sequence of its own, one step of n = N envs), state [n, state_size]
        the core's state before each sequence (None: zero, an episode's start)
        -> (policy head output [N, n_actions], value [N], the core's state after each sequence [n, state_size])."""
        if self.obs_stats is not None:
            obs = self.obs_stats.normalize(obs)
        if state is None:
            state = self.initial_state(len(obs) if lengths is None else len(lengths))
        h, state = self.core(self.torso(obs), state, lengths)
        h_critic = h if self.critic_torso is None else self.critic_torso(obs)
        return self.policy(h), self.value(h_critic).squeeze(-1), state

    def initial_state(self, n):
        """The core's state at an episode's start, for n envs: zero [n, state_size]."""
        return torch.zeros(n, self.core.state_size)

    def reward_scale(self):
        """What rewards are multiplied by before the critic learns from them: 1 / the running standard
        deviation of the discounted return with normalize_reward (as VecNormalize does), else 1."""
        return 1.0 if self.return_stats is None else 1.0 / self.return_stats.std().item()


MODEL_FLAGS = ("normalize_obs", "normalize_reward", "separate_critic", "lstm")  # on/off flags that shape the model


def new_model(shape, args):
    """The ActorCritic for an env's model_shape (or a checkpoint's) and the flags that shape the network."""
    return ActorCritic(**shape, hidden=args.hidden, log_std_init=args.log_std_init,
                       **{flag: getattr(args, flag) for flag in MODEL_FLAGS})


def sample_actions(model, obs, state, rng):
    """Sample a_k ~ pi(.|s_k) for one step of K envs, without an autograd graph: obs [K, obs_size], state
    [K, state_size] the core's state before it. Returns the actions and the core's state after the step."""
    with torch.inference_mode():
        head_out, _, state = model(torch.from_numpy(obs), torch.from_numpy(state))
        return model.policy.sample(head_out.numpy(), rng), state.numpy()


# --- 4. Shared optimizer ---------------------------------------------------------------------------

class SharedAdam(torch.optim.Adam):
    """torch.optim.Adam whose state lives in shared memory, so every worker updates the same moments.

    The state (step, exp_avg, exp_avg_sq) is created here, at construction, exactly as stock Adam would
    create it lazily, then moved to shared memory. step() is not overridden: stock Adam updates these
    tensors in place, so with one process the result equals torch.optim.Adam's to the bit.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, fused=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         fused=fused)
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

    def load_state_dict(self, state_dict):
        """Load as Adam does (which makes new state tensors), then put them back in shared memory."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for tensor in state.values():
                tensor.share_memory_()

    def share_memory(self):
        """The state is shared from the start; kept so code written as `SharedAdam(...).share_memory()` runs."""
        return self


# --- 5. Rollouts -----------------------------------------------------------------------------------

class StepBuffer(NamedTuple):
    """Where a worker writes the n_steps x K transitions of one update, reused update after update.

    In data mode the learner allocates a few per worker in shared memory before the workers start, so a
    rollout crosses the pipe as a few numbers saying where it lies instead of as pickled frames (as in
    TorchBeast's monobeast). Fields are torch tensors, which a spawned process receives as shared memory;
    numpy() gives the views the acting loop writes through.
    """
    obs: torch.Tensor        # [n_steps, K, obs_size] float32 or [n_steps, K, C, H, W] uint8: s_t
    actions: torch.Tensor    # [n_steps, K] int64 or [n_steps, K, D] float32, as sampled
    rewards: torch.Tensor    # [n_steps, K] float32
    final_obs: torch.Tensor  # like obs: s_{t+1} at [t, k] when env k's rollout ends after step t
    states: torch.Tensor     # [n_steps, K, state_size] float32: the core's state before step t (zero at an
                             # episode's first step; size 0 without --lstm)

    def numpy(self):
        return StepBuffer(*(field.numpy() for field in self))


def step_buffer(model, n_steps, n_envs, shared=False):
    """A StepBuffer for the observations and actions of this model, in shared memory if shared."""
    frames = not isinstance(model.obs_size, int)  # frames stay uint8 (observation_batch)
    obs_shape, obs_dtype = (model.obs_size, torch.uint8) if frames else ((model.obs_size,), torch.float32)
    action_dtype = torch.from_numpy(np.empty(0, model.policy.action_dtype)).dtype
    buffer = StepBuffer(torch.zeros(n_steps, n_envs, *obs_shape, dtype=obs_dtype),
                        torch.zeros(n_steps, n_envs, *model.policy.action_shape, dtype=action_dtype),
                        torch.zeros(n_steps, n_envs),
                        torch.zeros(n_steps, n_envs, *obs_shape, dtype=obs_dtype),
                        torch.zeros(n_steps, n_envs, model.core.state_size))
    return StepBuffer(*(field.share_memory_() for field in buffer)) if shared else buffer


class Segment(NamedTuple):
    """One rollout's place in a StepBuffer: env k's steps start .. stop - 1, and how it ended."""
    env: int
    start: int
    stop: int
    terminated: bool  # the MDP ended: R_T = 0
    truncated: bool   # a time limit cut the episode: R_T = V(s_T), like a rollout cut by n_steps
    episode: tuple    # (return, length) of the episode that ended with this rollout, else None


def collect_segments(envs, model, obs, state, buffer, rng):
    """Act buffer's n_steps in each of a worker's envs, choosing all their actions in one forward pass.

    obs [K, obs_size] holds each env's current observation and state [K, state_size] the core's state
    before it; both are updated in place, so they carry on into the next call. The state is zeroed when
    an episode starts (the new one must not remember the old one). The transitions go into buffer (numpy
    views), with the state before each step, so that the learning pass can start each rollout from the
    state its env had. Returns the Segments, one per env and per episode piece: an episode that
    ends closes its env's rollout there, so a rollout never spans two episodes and only its last step
    can need a bootstrap. The env is then reset and its next rollout starts from the reset observation,
    which is never a bootstrap state: the episode's own last observation is kept in final_obs.
    """
    n_steps = len(buffer.obs)
    starts = [0] * len(envs)  # where each env's open rollout began
    segments = []
    for t in range(n_steps):
        buffer.obs[t] = obs
        buffer.states[t] = state
        buffer.actions[t], state[:] = sample_actions(model, obs, state, rng)
        for k, env in enumerate(envs):
            next_obs, buffer.rewards[t, k], terminated, truncated, info = env.step(buffer.actions[t, k])
            if terminated or truncated:
                episode = (float(info["episode"]["r"]), int(info["episode"]["l"]))
                buffer.final_obs[t, k] = next_obs
                segments.append(Segment(k, starts[k], t + 1, terminated, truncated, episode))
                next_obs, _ = env.reset()
                state[k] = 0.0
                starts[k] = t + 1
            obs[k] = next_obs
    for k in range(len(envs)):  # rollouts cut by n_steps: bootstrap from the current observation
        if starts[k] < n_steps:
            buffer.final_obs[n_steps - 1, k] = obs[k]
            segments.append(Segment(k, starts[k], n_steps, False, False, None))
    return segments


class Rollout(NamedTuple):
    """One Segment's transitions, as the loss reads them."""
    obs: np.ndarray         # [T, obs_size] float32 or [T, C, H, W] uint8 frames: s_0 .. s_{T-1}
    actions: np.ndarray     # [T] int64 (Discrete) or [T, D] float32 (Box, as sampled: not clipped)
    rewards: np.ndarray     # [T] float32
    final_obs: np.ndarray   # one observation: s_T
    terminated: bool        # the Segment's: whether R_T is 0 or V(s_T) (bootstrap_values)
    initial_state: np.ndarray  # [state_size] the core's state before s_0, as the worker had it


def rollouts_in(buffer, segments):
    """The Rollouts that segments mark out in a StepBuffer (numpy views), as views: nothing is copied."""
    return [Rollout(buffer.obs[s.start:s.stop, s.env], buffer.actions[s.start:s.stop, s.env],
                    buffer.rewards[s.start:s.stop, s.env], buffer.final_obs[s.stop - 1, s.env], s.terminated,
                    buffer.states[s.start, s.env])
            for s in segments]


# --- 6. Returns and loss ---------------------------------------------------------------------------

def replay(model, rollouts):
    """The learning pass: the model's outputs at every step of a batch of rollouts, under its current weights.

    Each rollout runs from the core's state its worker had before its first step, which is data: no
    gradient flows back into the rollout before (truncated backpropagation through time over --n-steps).
    In data mode that is also what lets the learner replay exactly what the worker saw.
    Returns: head outputs [N, ...] and values [N] of the steps laid end to end, the state after each rollout.
    """
    obs = torch.from_numpy(np.concatenate([r.obs for r in rollouts]))  # s_0 .. s_{T-1} of each rollout
    initial_states = torch.from_numpy(np.stack([r.initial_state for r in rollouts]))
    return model(obs, initial_states, [len(r.rewards) for r in rollouts])


def bootstrap_values(model, rollouts, states):
    """R_T, where each rollout's returns start: 0 if its episode terminated (nothing follows a terminal
    state), else V(s_T) of its final observation, because the episode goes on past a time limit or a cut
    by n_steps (Mnih et al. 2016, Alg. S3). Computed without gradient: R is the critic's target.

    Args: rollouts with final_obs and terminated; states [N, state_size], the core's state after each
    rollout's last step (replay's). Returns: a list of floats, one per rollout.
    """
    with torch.no_grad():
        _, final_values, _ = model(torch.from_numpy(np.stack([r.final_obs for r in rollouts])), states)  # [N]
    return [0.0 if r.terminated else v for r, v in zip(rollouts, final_values.tolist())]


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


def lambda_returns(rewards, values, bootstrap_value, gamma, lam):
    """GAE's value targets (Schulman et al. 2016): R_t = r_t + gamma * ((1 - lam) V(s_{t+1}) + lam R_{t+1}),
    with R_T = bootstrap_value, so that R_t - V(s_t) is the GAE(gamma, lam) advantage sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t).

    That recursion is an n-step return of the rewards r_t + gamma (1 - lam) V(s_{t+1}) discounted by gamma lam:
    with lam = 1 it is exactly n_step_returns (the paper's A3C), with lam = 0 the one-step TD target.
    Args: rewards [T], values [T] = V(s_0) .. V(s_{T-1}) (no gradient), bootstrap_value as for n_step_returns.
    Returns: float32 tensor [T].
    """
    next_values = np.append(np.asarray(values, dtype=np.float32)[1:], np.float32(bootstrap_value))  # V(s_{t+1})
    return n_step_returns(rewards + gamma * (1 - lam) * next_values, bootstrap_value, gamma * lam)


def a3c_loss(log_probs, entropy, values, returns, value_coef, entropy_coef):
    """policy_loss + value_coef * value_loss - entropy_coef * entropy, averaged over the T steps.

    Args: log_probs [T] = log pi(a_t|s_t), entropy [T] of pi(.|s_t) (from the policy head, whatever the
    action space), values [T] = V(s_t), returns [T] = R_t.
    The advantage A_t = R_t - V(s_t) is detached in the policy term, so that term trains only the
    policy and the critic learns from the value loss alone (Mnih et al. 2016, Alg. S3).
    We average over steps instead of summing as Alg. S3 does: the gradient's scale, and so the right
    learning rate, then does not depend on the rollout length or on how many rollouts are batched.
    Returns the loss and its three terms, detached, for monitoring.
    """
    T = log_probs.shape[0]
    assert log_probs.shape == entropy.shape == values.shape == returns.shape == (T,)
    advantages = (returns - values).detach()  # [T]
    policy_loss = -(log_probs * advantages).mean()
    value_loss = 0.5 * (returns - values).pow(2).mean()
    entropy = entropy.mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
    return loss, {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy.detach()}


def explained_variance(values, returns):
    """1 - Var(R - V) / Var(R) over a batch: 1 when V(s) predicts the returns exactly, 0 when it does no
    better than their mean, negative when worse; nan when the returns do not vary. Args: [T], [T]."""
    variance = returns.var(correction=0)
    if variance == 0:
        return torch.tensor(float("nan"))
    return 1 - (returns - values).var(correction=0) / variance


def rollout_loss(model, rollouts, gamma, value_coef, entropy_coef, reward_scale=1.0, gae_lambda=1.0):
    """The A3C loss of a batch of rollouts under the model's current weights: the single piece of maths
    both modes train with, from the rollouts to one scalar.

    The critic learns the values of rewards * reward_scale * model.reward_scale(). Scaling every reward
    by one positive factor scales every return and value by it and leaves the best policy unchanged, but
    it sets the size of the value loss (which grows with its square) against the policy and entropy
    terms: with raw returns near 1 / (1 - gamma) = 100, the value gradient swamps the shared torso.
    The final observations get their own forward pass (bootstrap_values), without autograd: inside the
    trained batch they would cost backward work for rows that receive no gradient.
    """
    head_out, values, final_states = replay(model, rollouts)
    scale = reward_scale * model.reward_scale()
    values_of = np.split(values.detach().numpy(), np.cumsum([len(r.rewards) for r in rollouts])[:-1])
    returns = torch.cat([lambda_returns(r.rewards * scale, v, bootstrap, gamma, gae_lambda)
                         for r, v, bootstrap in zip(rollouts, values_of,
                                                    bootstrap_values(model, rollouts, final_states.detach()))])
    actions = torch.from_numpy(np.concatenate([r.actions for r in rollouts]))
    log_probs, entropy = model.policy.log_prob_entropy(head_out, actions)
    loss, stats = a3c_loss(log_probs, entropy, values, returns, value_coef, entropy_coef)
    return loss, {**stats, "explained_variance": explained_variance(values.detach(), returns)}


def check_finite(loss):
    """Stop before a NaN or an infinity reaches the weights: nothing learns from it, and it spreads."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}: training diverged (try a smaller --lr)")


# --- 7. Workers ------------------------------------------------------------------------------------

def sync_model(local_model, shared_model):
    """Copy the shared weights, and running statistics if any, into the local model in place."""
    with torch.no_grad():
        for local, shared in zip([*local_model.parameters(), *local_model.buffers()],
                                 [*shared_model.parameters(), *shared_model.buffers()]):
            local.copy_(shared)


def hogwild_update(local_model, shared_model, optimizer, loss, max_grad_norm):
    """Back-propagate the loss into the local model and apply that gradient to the shared model.

    Since torch 2.0 zero_grad() sets gradients to None, so the old trick of aliasing the local
    gradients into the shared parameters once would leave them summing across updates: we clear the
    local gradients and hand them over again on every update, so each step applies this loss alone.
    There is no lock: workers overwrite each other's updates now and then, which Hogwild (Recht et
    al. 2011) shows costs little, and which is how Mnih et al. 2016 ran A3C.
    Returns the gradient's norm before clipping.
    """
    local_model.zero_grad()
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(local_model.parameters(), max_grad_norm)
    for local, shared in zip(local_model.parameters(), shared_model.parameters()):
        shared.grad = local.grad
    optimizer.step()
    return grad_norm


def update_statistics(shared_model, buffer, segments, discounted, gamma):
    """Fold what a worker's envs just showed into the shared model's running statistics, if it keeps any:
    the observations s_t, and the discounted return G = r_t + gamma G of each env, zeroed when an episode
    ends, whose standard deviation scales the rewards (VecNormalize's rule). discounted [K] carries each
    env's G from one rollout to the next."""
    if shared_model.obs_stats is not None:
        shared_model.obs_stats.update(buffer.obs.reshape(-1, buffer.obs.shape[-1]))
    if shared_model.return_stats is not None:
        ended = np.zeros(buffer.rewards.shape, dtype=bool)  # [n_steps, K]
        for s in segments:
            ended[s.stop - 1, s.env] = s.episode is not None
        seen = np.empty_like(buffer.rewards)
        for t in range(len(seen)):
            discounted[:] = gamma * discounted + buffer.rewards[t]
            seen[t] = discounted
            discounted[ended[t]] = 0.0
        shared_model.return_stats.update(seen.reshape(-1))


def worker_setup(rank, args):
    """What every worker does first: its seeds, its own envs, its own local model, and where each env's
    first step starts from: its observation and the core's zero state."""
    torch.manual_seed(args.seed + rank)
    rng = np.random.default_rng(args.seed + rank)
    # env k of worker i starts from seed + i + k * workers: with one env per worker, worker i uses seed + i
    seeds = [args.seed + rank + k * args.workers for k in range(args.envs_per_worker)]
    envs = [make_env(args.env, seed, frame_stack=args.frame_stack) for seed in seeds]
    obs = observation_batch([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
    model = new_model(model_shape(envs[0]), args)
    return envs, model, obs, model.initial_state(len(envs)).numpy(), rng


class UpdateReport(NamedTuple):
    """Gradient worker -> main process, now and then: what the monitor shows."""
    rank: int
    episodes: list        # (return, length) of each episode that ended since the last report
    stats: "UpdateStats"  # statistics of the updates since the last report, summed


def gradient_worker(rank, args, shared_model, optimizer, worker_steps, messages, stop_event, parent_pid):
    """Hogwild worker (Mnih et al. 2016, Alg. S3): act, compute the gradient, apply it to the shared model."""
    with worker_process(rank, messages):
        envs, local_model, obs, state, rng = worker_setup(rank, args)
        buffer = step_buffer(local_model, args.n_steps, len(envs)).numpy()
        discounted = np.zeros(len(envs))
        stats, last_sent = UpdateStats(), time.monotonic()
        while not stop_event.is_set() and parent_alive(parent_pid):
            sync_model(local_model, shared_model)
            segments = collect_segments(envs, local_model, obs, state, buffer, rng)
            loss, update = rollout_loss(local_model, rollouts_in(buffer, segments), args.gamma, args.value_coef,
                                        args.entropy_coef, args.reward_scale, args.gae_lambda)
            check_finite(loss)
            update["grad_norm"] = hogwild_update(local_model, shared_model, optimizer, loss, args.max_grad_norm)
            update_statistics(shared_model, buffer, segments, discounted, args.gamma)  # after: acted and learned alike
            stats.add(update)
            worker_steps[rank] += args.n_steps * len(envs)
            episodes = [s.episode for s in segments if s.episode is not None]
            # Sent with each episode that ends, and at least once a second so long episodes do not hide the
            # statistics; summed in between, so the main process reads one message, not one per update.
            if episodes or time.monotonic() - last_sent >= 1.0:
                messages.put(UpdateReport(rank, episodes, stats))
                stats, last_sent = UpdateStats(), time.monotonic()


class Hogwild:
    """Gradient mode, seen from the main process: the workers learn on their own, writing the shared model
    through SharedAdam; their reports only feed the monitor."""
    worker = staticmethod(gradient_worker)  # what each worker process runs (Learner has the same three members)

    def __init__(self, args, shared_model, ctx):
        self.shared_model = shared_model
        # fused: one kernel updates every parameter, instead of a Python loop over them
        self.optimizer = SharedAdam(shared_model.parameters(), lr=args.lr, fused=True)

    def worker_args(self, rank):
        return self.shared_model, self.optimizer

    def receive(self, report, monitor, steps):
        for episode in report.episodes:
            monitor.add_episode(report.rank, *episode, steps)
        monitor.stats.merge(report.stats)


class FilledBuffer(NamedTuple):
    """Data worker -> learner: where a worker's rollouts lie, a message of a few hundred bytes."""
    rank: int
    index: int       # which of the worker's StepBuffers holds them
    version: int     # the policy version that chose the actions
    segments: list   # the Segments: which steps of which env form each rollout, and how it ended


def data_worker(rank, args, shared_model, policy_version, buffers, free_buffers, worker_steps, messages,
                stop_event, parent_pid):
    """Data-parallel worker: act with a fresh copy of the shared weights into a shared StepBuffer, and tell
    the learner where the rollouts lie (a FilledBuffer)."""
    with worker_process(rank, messages):
        envs, local_model, obs, state, rng = worker_setup(rank, args)
        buffers = [buffer.numpy() for buffer in buffers]
        discounted = np.zeros(len(envs))
        sent = 0
        while not stop_event.is_set() and parent_alive(parent_pid):
            # The learner hands a buffer back (releases free_buffers) once it has learned from it, in the
            # order they were sent. With none free the worker waits: a slow learner holds the workers back
            # instead of letting rollouts, and policy lag, pile up. The timeout keeps checking whether to stop.
            if not free_buffers.acquire(timeout=0.1):
                continue
            index = sent % len(buffers)
            version = policy_version.value  # read first: the weights copied next are at least this new
            sync_model(local_model, shared_model)
            segments = collect_segments(envs, local_model, obs, state, buffers[index], rng)
            update_statistics(shared_model, buffers[index], segments, discounted, args.gamma)
            worker_steps[rank] += args.n_steps * len(envs)
            # A few hundred bytes, one Segment per rollout: under PIPE_BUF (4 KiB) unless a worker steps
            # hundreds of envs, the pipe takes it in one atomic write, so a worker killed while sending leaves
            # the whole message or none, never half of one that would stall the learner's read.
            messages.put(FilledBuffer(rank, index, version, segments))
            sent += 1


# --- 8. Learner (data mode) ------------------------------------------------------------------------

class Learner:
    """Data mode's learner, in the main process: the single writer of the weights.

    It owns the step buffers the workers fill (a few per worker, in shared memory), one semaphore per
    worker counting that worker's free buffers, the policy version the workers stamp their rollouts
    with, and the batch of messages it has not learned from yet. receive() takes one message and learns
    once --batch-rollouts of them have come.
    """
    worker = staticmethod(data_worker)

    def __init__(self, args, shared_model, ctx):
        self.args, self.shared_model = args, shared_model
        self.optimizer = torch.optim.Adam(shared_model.parameters(), lr=args.lr, fused=True)
        self.version = ctx.Value("q", 0, lock=False)  # written by the learner alone
        self.batch_size = args.batch_rollouts or args.workers
        # The learner holds a batch's buffers until it has learned from them: with fewer buffers than
        # batch_size in all, every worker could end up waiting for one, and the learner for a message.
        # One more per worker lets it act while the learner learns.
        per_worker = math.ceil(self.batch_size / args.workers) + 1
        one = sum(field.nbytes for field in step_buffer(shared_model, args.n_steps, args.envs_per_worker))
        require_shared_memory(one * per_worker * args.workers)
        self.buffers = [[step_buffer(shared_model, args.n_steps, args.envs_per_worker, shared=True)
                         for _ in range(per_worker)] for _ in range(args.workers)]
        self.free_buffers = [ctx.Semaphore(per_worker) for _ in range(args.workers)]
        self.batch = []  # FilledBuffers not learned from yet

    def worker_args(self, rank):
        return self.shared_model, self.version, self.buffers[rank], self.free_buffers[rank]

    def receive(self, message, monitor, steps):
        for segment in message.segments:
            if segment.episode is not None:
                monitor.add_episode(message.rank, *segment.episode, steps)
        self.batch.append(message)
        if len(self.batch) == self.batch_size:
            monitor.stats.add(self.learn())

    def learn(self):
        """One gradient step on the batch with the current weights; then its buffers go back to the workers.

        A3C has no off-policy correction: the actions were sampled by weights a few updates old (the
        policy lag), and the gradient treats them as on-policy. IMPALA's V-trace is the fix for large lags.
        Returns the update's statistics: rollout_loss's, the gradient norm before clipping and the lag.
        """
        args = self.args
        rollouts = [rollout for m in self.batch
                    for rollout in rollouts_in(self.buffers[m.rank][m.index].numpy(), m.segments)]
        loss, update = rollout_loss(self.shared_model, rollouts, args.gamma, args.value_coef, args.entropy_coef,
                                    args.reward_scale, args.gae_lambda)
        check_finite(loss)
        self.optimizer.zero_grad()
        loss.backward()
        update["grad_norm"] = nn.utils.clip_grad_norm_(self.shared_model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        update["policy_lag"] = sum(self.version.value - m.version for m in self.batch) / len(self.batch)
        self.version.value += 1
        for m in self.batch:  # learned from: the worker may overwrite it
            self.free_buffers[m.rank].release()
        self.batch = []
        return update


# --- 9. Processes: start, signals, liveness, stop -------------------------------------------------

def start_method():
    """fork on Linux, spawn elsewhere, chosen explicitly (Python 3.14 made forkserver Linux's default).

    fork starts a worker with torch already imported, where spawn imports it again in every worker. It is
    safe here because the main process has no thread yet when the workers start (the TensorBoard writer
    comes after them). spawn is the only way on Windows and the safe one on macOS.
    """
    return mp.get_context("fork" if sys.platform == "linux" else "spawn")


def keep_freed_memory():
    """Ask glibc to keep the memory torch frees for reuse, instead of handing it back to the OS at once.

    Each update allocates and frees the same large temporaries (a Pong batch as floats). glibc serves such
    blocks with mmap and unmaps them on free, so every update would pay again for fresh zeroed pages.
    glibc (Linux) only; elsewhere it does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap,
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: and up to 1 GB of freed heap stays with the process


SHARED_MEMORY = "/dev/shm"  # where torch's shared tensors live on Linux


def shared_memory_free():
    """Bytes free in SHARED_MEMORY, or None where there is no such file system (not Linux)."""
    try:
        stat = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def require_shared_memory(needed):
    """Refuse step buffers the shared-memory file system cannot hold, before any process starts: torch
    would fail halfway with a traceback. A container's is often small (Docker's default: 64 MB)."""
    free = shared_memory_free()
    if free is not None and needed > free:
        raise UsageError(f"data mode's step buffers need {needed / 2**20:.1f} MiB of shared memory and "
                         f"{SHARED_MEMORY} has {free / 2**20:.1f} MiB free: lower --workers, --envs-per-worker "
                         f"or --n-steps, or enlarge {SHARED_MEMORY} (docker run --shm-size)")


DIVERGED = 3  # a worker's exit code when its loss stopped being finite


@contextlib.contextmanager
def worker_process(rank, messages):
    """How every worker process runs and ends.

    One thread (two cores: a worker that spawns threads only slows the others down); signals left to the
    main process, which decides when to stop; exit code DIVERGED with one line for a non-finite loss, 1 and
    the traceback for any other error; never blocked at exit on messages that nobody will read any more.
    """
    torch.set_num_threads(1)
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, which fork copies
    try:
        yield
    except FloatingPointError as e:
        print(f"worker {rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(DIVERGED)
    except Exception:
        print(f"worker {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        messages.cancel_join_thread()


def parent_alive(parent_pid):
    """A worker whose parent died (even by SIGKILL) is re-parented: stop rather than run on as an orphan."""
    return os.getppid() == parent_pid


class Stop(Exception):
    """Raised in the main process to end training early, with the exit code main() returns.

    save=False when training diverged: the last checkpoint written before is the last good one.
    """

    def __init__(self, message, exit_code, save=True):
        super().__init__(message)
        self.exit_code, self.save = exit_code, save


class StopSignals:
    """SIGINT and SIGTERM while training: the handler only notes the signal and the loop acts on it (check).

    A handler that raised at once would raise wherever the main process happens to be, in data mode often
    in the middle of reading a message from the pipe: the half-read message then breaks the clean-up
    that drains the queue. The loop comes round at least every 0.1 s, so stopping waits no longer.
    A second signal during the clean-up is noted too, and so cannot cut it short.
    """

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def note(self, signum, frame):
        self.received = signum

    def check(self):
        if self.received is not None:  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
            raise Stop(f"stopped by {signal.Signals(self.received).name}", 128 + self.received)

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Workers:
    """A run's worker processes and what they share with the main process: one env-step counter each, the
    queue of their messages and the stop event."""

    def __init__(self, ctx, args, mode):
        # One slot per worker and no lock: each slot has one writer, and a worker killed while holding a
        # lock would leave it locked for good, hanging whoever reads the counter next.
        self.worker_steps = ctx.Array("q", args.workers, lock=False)
        self.messages = ctx.Queue()  # UpdateReports (gradient mode) or FilledBuffers (data mode)
        self.stop_event = ctx.Event()
        self.processes = [ctx.Process(target=mode.worker, daemon=True, args=(
            rank, args, *mode.worker_args(rank), self.worker_steps, self.messages, self.stop_event, os.getpid()))
            for rank in range(args.workers)]

    def start(self):
        for process in self.processes:
            process.start()

    def steps(self):
        return sum(self.worker_steps)

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
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
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


# --- 10. Checkpoints --------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "a3c.py checkpoint v4"  # v3: the MODEL_FLAGS (running statistics, a separate critic); v4: lstm
OLDER_FORMATS = {"a3c.py checkpoint v2": dict.fromkeys(MODEL_FLAGS, False),  # v2 had none of the flags,
                 "a3c.py checkpoint v3": {"lstm": False}}  # v3 had no LSTM


def save_checkpoint(path, model, optimizer, args, steps, episodes, recent_returns):
    """Write everything --eval and --resume need, atomically: a crash mid-write leaves the old file whole.

    Returns False, writing nothing, when a weight is not finite: the last good checkpoint then stays.
    """
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return False
    checkpoint = {"format": CHECKPOINT_FORMAT, "env": args.env, "obs_size": model.obs_size,
                  "n_actions": model.policy.out.out_features, "hidden": model.hidden,
                  "continuous": isinstance(model.policy, GaussianHead),
                  "normalize_obs": model.obs_stats is not None, "normalize_reward": model.return_stats is not None,
                  "separate_critic": model.critic_torso is not None,  # the MODEL_FLAGS it was built with
                  "lstm": isinstance(model.core, LSTMCore),
                  "model": model.state_dict(), "optimizer": optimizer.state_dict(), "args": vars(args),
                  "steps": steps, "episodes": episodes, "recent_returns": list(recent_returns)}
    tmp = f"{path}.tmp"  # in the same folder, so os.replace is a rename within one file system
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # open() may have failed before creating it
            os.unlink(tmp)
        raise
    return True


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint, or raise UsageError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, weights_only=True)  # weights_only: loading runs no pickled code
    except Exception as e:
        raise UsageError(f"checkpoint {path}: not readable as an a3c.py checkpoint ({type(e).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (CHECKPOINT_FORMAT, *OLDER_FORMATS):
        raise UsageError(f"checkpoint {path}: not an a3c.py checkpoint")
    return {**OLDER_FORMATS.get(checkpoint["format"], {}), **checkpoint}


def checkpoint_shape(checkpoint):
    """What the checkpoint's model was built for, as model_shape gives it for an env."""
    return {"obs_size": checkpoint["obs_size"], "n_actions": checkpoint["n_actions"],
            "continuous": checkpoint["continuous"]}


# --- 11. Monitor and training loop -----------------------------------------------------------------

class UpdateStats:
    """Sums of per-update statistics, so that the monitor shows (and workers send) their means now and then,
    not every update.

    Each statistic counts its finite values only: explained variance is nan for a batch whose returns do
    not vary, and gradient mode has no policy lag.
    """
    TAGS = {"policy_loss": "update/policy_loss", "value_loss": "update/value_loss", "entropy": "update/entropy",
            "explained_variance": "update/explained_variance", "grad_norm": "update/grad_norm",
            "policy_lag": "data_mode/policy_lag"}  # each statistic's TensorBoard tag

    def __init__(self):
        self.sums, self.counts = np.zeros(len(self.TAGS)), np.zeros(len(self.TAGS), dtype=np.int64)

    def add(self, update):
        values = np.array([float(update.get(name, math.nan)) for name in self.TAGS])
        finite = np.isfinite(values)
        self.sums[finite] += values[finite]
        self.counts += finite

    def merge(self, other):
        self.sums += other.sums
        self.counts += other.counts

    def means(self):
        return {name: s / n for name, s, n in zip(self.TAGS, self.sums, self.counts) if n > 0}


class Monitor:
    """Episode statistics, progress lines, the episode CSV, TensorBoard and the stop criteria, in both modes.

    The main process is the only writer of the CSV and the event files: workers send what they measure.
    """

    def __init__(self, args, steps=0, episodes=0, recent_returns=()):
        self.args = args
        self.recent = deque(recent_returns, maxlen=100)
        self.episodes, self.start_steps, self.last_steps = episodes, steps, steps
        self.start = self.last_print = time.perf_counter()
        self.stats = UpdateStats()
        self.writer = None  # opened by open_tensorboard, once the workers run
        self.csv_file = open(args.log_csv, "a", newline="") if args.log_csv else None
        if self.csv_file is not None:
            self.csv = csv.writer(self.csv_file)
            if self.csv_file.tell() == 0:
                self.csv.writerow(["wall_time", "steps", "worker", "return", "length"])

    def open_tensorboard(self):
        """Start the event-file writer, and record the run's flags as a table.

        Called after the workers have started: the writer runs a thread, and fork copies no thread.
        """
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

    def mean_return(self):
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def solved(self):
        return len(self.recent) == self.recent.maxlen and self.mean_return() >= self.args.target_return

    def done(self, steps):
        return (self.solved() or (self.args.max_episodes is not None and self.episodes >= self.args.max_episodes)
                or (self.args.max_steps is not None and steps >= self.args.max_steps))

    def progress(self, steps, force=False):
        """Every --log-interval seconds: one line, and one TensorBoard point per statistic, each a mean over
        the updates since the last time (so logging costs the same whatever the update rate)."""
        now = time.perf_counter()
        if not force and now - self.last_print < self.args.log_interval:
            return
        elapsed = now - self.start
        means = self.stats.means()
        line = (f"episodes={self.episodes} steps={steps} steps_per_second={(steps - self.start_steps) / elapsed:.0f} "
                f"mean_return={self.mean_return():.1f} seconds={elapsed:.1f}")
        if "entropy" in means:  # a collapsing entropy or a critic that fits nothing shows here first
            line += f" entropy={means['entropy']:.3f} explained_variance={means.get('explained_variance', math.nan):.2f}"
        if "policy_lag" in means:
            line += f" mean_lag={means['policy_lag']:.2f}"
        print(line, flush=True)
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(UpdateStats.TAGS[name], value, steps)
            if now > self.last_print:
                self.writer.add_scalar("speed/steps_per_second", (steps - self.last_steps) / (now - self.last_print),
                                       steps)
        self.last_print, self.last_steps = now, steps
        self.stats = UpdateStats()

    def summary(self, steps):
        elapsed = time.perf_counter() - self.start
        return {"solved": self.solved(), "episodes": self.episodes, "steps": steps, "seconds": elapsed,
                "steps_per_second": (steps - self.start_steps) / elapsed, "mean_return": self.mean_return()}

    def close(self):
        if self.csv_file is not None:
            self.csv_file.close()
        if self.writer is not None:
            self.writer.close()


def train(args, checkpoint=None):
    """Train until solved, a budget runs out or a stop; returns a summary dict with the exit code.

    The main process runs the monitor and, in data mode, the learner: the single writer of the weights,
    holding the optimizer, so weights and optimizer state never travel back from another process and a
    checkpoint is a plain save from here.
    """
    torch.set_num_threads(1)
    keep_freed_memory()  # for the learner, in data mode
    torch.manual_seed(args.seed)
    env = make_env(args.env, frame_stack=args.frame_stack)
    shared_model = new_model(model_shape(env), args)
    env.close()
    shared_model.share_memory()
    ctx = start_method()
    mode = (Hogwild if args.mode == "gradient" else Learner)(args, shared_model, ctx)
    counters = {"steps": 0, "episodes": 0, "recent_returns": []}
    if checkpoint is not None:
        shared_model.load_state_dict(checkpoint["model"])
        mode.optimizer.load_state_dict(checkpoint["optimizer"])
        counters = {key: checkpoint[key] for key in counters}
    monitor = Monitor(args, **counters)
    workers = Workers(ctx, args, mode)

    def global_step():
        return counters["steps"] + workers.steps()

    def save():
        return save_checkpoint(args.save, shared_model, mode.optimizer, args, global_step(), monitor.episodes,
                               monitor.recent)

    outcome = {"exit_code": 0, "message": None, "save": True}
    with StopSignals() as signals:
        try:
            workers.start()
            if args.tensorboard is not None:
                monitor.open_tensorboard()
            last_save = time.monotonic()
            while not monitor.done(global_step()):
                signals.check()
                message = workers.next_message(timeout=0.1)
                if message is not None:
                    mode.receive(message, monitor, global_step())
                if time.monotonic() - last_save >= args.save_every:
                    save()
                    last_save = time.monotonic()
                monitor.progress(global_step())
        except Stop as stop:
            outcome = {"exit_code": stop.exit_code, "message": str(stop), "save": stop.save}
        except FloatingPointError as error:  # the learner's loss, in data mode
            outcome = {"exit_code": 1, "message": str(error), "save": False}
        finally:
            workers.stop()
            saved = outcome["save"] and save()
            monitor.progress(global_step(), force=True)
            monitor.close()
    return {**monitor.summary(global_step()), **outcome, "saved": saved}


# --- 12. Evaluation --------------------------------------------------------------------------------

def evaluate(args, checkpoint):
    """Play --episodes episodes with the checkpoint's most probable action; returns a summary dict."""
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
    model = new_model(checkpoint_shape(checkpoint), args)  # prepare() took the flags that shape it from it
    model.load_state_dict(checkpoint["model"])
    returns, steps, start = [], 0, time.perf_counter()
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        state, done = model.initial_state(1), False  # the core's state, carried through the episode
        while not done:
            with torch.inference_mode():  # the most probable action: argmax, or the Gaussian's mean
                head_out, _, state = model(torch.from_numpy(observation_batch([obs])), state)
            obs, _, terminated, truncated, info = env.step(model.policy.mode(head_out.numpy())[0])
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

def make_folder(flag, folder):
    """Create an output folder now, so that a path that cannot be one is a usage error, not a late crash."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot create it ({e.strerror})")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {folder}: cannot write in it")


def prepare(args):
    """Check every input before a process starts and fill in the defaults that depend on the env or the
    checkpoint (--env, --hidden, --normalize-*, --lstm, --frame-stack, --reward-scale, --target-return);
    returns the checkpoint to load, if any."""
    checkpoint = None
    path = args.eval or args.resume
    if args.eval and args.resume:
        raise UsageError("--eval and --resume exclude each other")
    if path:
        checkpoint = load_checkpoint(path)
        if args.env is not None and args.env != checkpoint["env"]:
            raise UsageError(f"checkpoint {path} was made for {checkpoint['env']}, not {args.env}")
        if args.hidden is not None and args.hidden != checkpoint["hidden"]:
            raise UsageError(f"checkpoint {path} has --hidden {checkpoint['hidden']}, not {args.hidden}")
        for flag in MODEL_FLAGS:  # the checkpoint's, which a flag cannot add to a trained model
            if getattr(args, flag) and not checkpoint[flag]:
                raise UsageError(f"checkpoint {path} was trained without --{flag.replace('_', '-')}")
            setattr(args, flag, checkpoint[flag])
        args.env, args.hidden = checkpoint["env"], checkpoint["hidden"]
        if not isinstance(checkpoint["obs_size"], int):  # frames: the stack's depth is the model's input width
            frames = checkpoint["obs_size"][0]
            if args.frame_stack is not None and args.frame_stack != frames:
                raise UsageError(f"checkpoint {path} has --frame-stack {frames}, not {args.frame_stack}")
            args.frame_stack = frames
    if args.lstm and args.separate_critic:
        raise UsageError("--lstm and --separate-critic exclude each other: the critic's own torso would have "
                         "no memory")
    args.env = args.env or "CartPole-v1"
    frame_stack_given, args.frame_stack = args.frame_stack is not None, args.frame_stack or 4
    try:
        env = make_env(args.env, frame_stack=args.frame_stack)
    except gym.error.Error as e:
        close = difflib.get_close_matches(args.env, gym.registry.keys(), n=3)
        hint = f" (close matches: {', '.join(close)})" if close and "did you mean" not in str(e).lower() else ""
        raise UsageError(f"environment {args.env!r}: {e}{hint}")
    except ValueError as e:
        raise UsageError(f"environment {e}")
    shape, render_modes = model_shape(env), env.metadata.get("render_modes", [])
    if args.normalize_obs and not isinstance(shape["obs_size"], int):
        env.close()
        raise UsageError(f"--normalize-obs: {args.env}'s observations are frames, which the network scales by 255")
    if frame_stack_given and isinstance(shape["obs_size"], int):
        env.close()
        raise UsageError(f"--frame-stack: {args.env}'s observations are vectors, not frames")
    args.hidden = args.hidden or (64 if isinstance(shape["obs_size"], int) else 256)
    args.reward_scale = args.reward_scale or (1.0 if args.normalize_reward else 0.1)
    if args.target_return is None:
        args.target_return = env.spec.reward_threshold
    env.close()
    if checkpoint is not None and shape != checkpoint_shape(checkpoint):
        raise UsageError(f"checkpoint {path} does not fit {args.env}'s observation and action spaces")
    if args.target_return is None and not args.eval:
        raise UsageError(f"{args.env} has no reward_threshold: give --target-return")
    if args.tensorboard is not None and not args.eval:
        try:
            import torch.utils.tensorboard  # noqa: F401  (optional: only this flag needs it)
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
        make_folder("--tensorboard", args.tensorboard)
    if args.video is not None:
        if not args.eval:
            raise UsageError("--video records --eval episodes: give --eval PATH too")
        if args.render:
            raise UsageError("--video and --render exclude each other")
        if "rgb_array" not in render_modes:
            raise UsageError(f"--video: {args.env} cannot render its screen as an image")
        try:
            import moviepy  # noqa: F401  (optional: gymnasium's RecordVideo needs it)
        except ImportError:
            raise UsageError("--video needs the moviepy package: pip install moviepy")
        make_folder("--video", args.video)
    if not args.eval:
        for flag, out in [("--save", args.save), ("--log-csv", args.log_csv)]:
            folder = os.path.dirname(os.path.abspath(out)) if out else None
            if folder and not os.access(folder, os.W_OK):
                raise UsageError(f"{flag} {out}: cannot write in {folder}")
    return checkpoint


def main(argv=None):
    args = parse_args(argv)
    try:
        checkpoint = prepare(args)
        summary = evaluate(args, checkpoint) if args.eval else train(args, checkpoint)
    except UsageError as e:
        print(f"a3c.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or during --eval (training turns it into a Stop)
        print("a3c.py: interrupted", file=sys.stderr)
        return 130
    if summary["message"]:
        kept = "" if args.eval else (f"; checkpoint saved to {args.save}" if summary["saved"]
                                     else f"; {args.save} keeps the last good checkpoint, if any")
        print(f"a3c.py: {summary['message']}{kept}", file=sys.stderr, flush=True)
    print("result: solved={} episodes={} steps={} seconds={:.1f} steps_per_second={:.0f} mean_return={:.1f}".format(
        "yes" if summary["solved"] else "no", summary["episodes"], summary["steps"], summary["seconds"],
        summary["steps_per_second"], summary["mean_return"]), flush=True)
    return summary["exit_code"]


if __name__ == "__main__":
    exit_code = main()
    # By now every file is closed and every worker joined. Python's own teardown would still spend most of
    # a second freeing the modules that torch's compiler imported with the first optimizer, work that
    # saves nothing: flush what is printed and leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
