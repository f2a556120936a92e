"""Launch-time helpers: how this process was started and how ranks find each other."""

from distrib.launch.env import LaunchEnv, LaunchEnvError, detect, world_size_hint

__all__ = ["LaunchEnv", "LaunchEnvError", "detect", "world_size_hint"]
