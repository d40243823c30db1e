"""Model hooks: code that runs before and after the node changes a model.

Events: ``pre-pull``, ``post-pull``, ``pre-push``, ``post-push``, ``pre-delete``,
``post-delete``, ``on-conflict``, ``on-replica-change``. A hook is a Python callable (sync or
async) registered with ``Hooks.add`` (``Node.add_model_hook``), or a shell command from the
``[hooks]`` section of node.toml, run with ``DMM_EVENT``, ``DMM_MODEL`` and one
``DMM_<DETAIL>`` variable per detail of the event.

A pre-hook that fails (raises, exits non-zero, or times out) aborts the operation:
``fire`` raises ``HookError`` whose message is the hook's own (a command's last stderr line).
Every other hook failing is logged and never fatal.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio

log = logging.getLogger("dmm.hooks")

EVENTS: Final = (
    "pre-pull",
    "post-pull",
    "pre-push",
    "post-push",
    "pre-delete",
    "post-delete",
    "on-conflict",
    "on-replica-change",
)
PRE_EVENTS: Final = frozenset(e for e in EVENTS if e.startswith("pre-"))
DEFAULT_TIMEOUT: Final = 30.0
# A hook's message reaches an API error line and a terminal: keep it to one short line.
MAX_MESSAGE: Final = 300
_ENV_KEY_RE: Final = re.compile(r"[^A-Z0-9]+")


@dataclass(frozen=True, slots=True)
class HookEvent:
    """What a hook is told: the event, the model (display name) and the event's details."""

    event: str
    model: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The variables a shell hook gets on top of the node's environment."""
        env = {"DMM_EVENT": self.event, "DMM_MODEL": self.model}
        for key, value in self.details.items():
            name = "DMM_" + _ENV_KEY_RE.sub("_", key.upper()).strip("_")
            env[name] = "" if value is None else str(value)
        return env


HookFn = Callable[[HookEvent], Awaitable[None] | None]


class HookError(RuntimeError):
    """A pre-hook refused the operation; ``str()`` is one line for the user."""

    def __init__(self, event: str, model: str, hook: str, message: str) -> None:
        self.event = event
        self.model = model
        self.hook = hook
        self.message = message
        super().__init__(f"{event} hook {hook} refused {model}: {message}")


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    fn: HookFn | None = None
    command: str | None = None


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


class Hooks:
    """The hooks of one node, by event, in the order they were added (commands first)."""

    def __init__(
        self,
        commands: Mapping[str, tuple[str, ...]] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self._hooks: dict[str, list[_Registered]] = {event: [] for event in EVENTS}
        self.counts: Counter[str] = Counter()  # filled by the counting hook
        self.failures: Counter[str] = Counter()
        for event, cmds in (commands or {}).items():
            for cmd in cmds:
                self._check_event(event)
                self._hooks[event].append(_Registered(f"`{cmd}`", command=cmd))

    @staticmethod
    def _check_event(event: str) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r} (one of: {', '.join(EVENTS)})")

    def add(self, event: str, fn: HookFn, *, name: str | None = None) -> None:
        """Run ``fn(HookEvent)`` on ``event``; a sync ``fn`` runs on a worker thread."""
        self._check_event(event)
        label = name or getattr(fn, "__qualname__", None) or repr(fn)
        self._hooks[event].append(_Registered(label, fn=fn))

    def listing(self) -> dict[str, list[str]]:
        """event -> names of its hooks (commands in backquotes), for status displays."""
        return {event: [h.name for h in hooks] for event, hooks in self._hooks.items() if hooks}

    def setup_default_hooks(self) -> None:
        """A logging hook and a counting hook on every event (counts in ``self.counts``).

        They run first, so every event fired is logged and counted even when a pre-hook
        after them refuses it."""
        for event in EVENTS:
            defaults = [
                _Registered("log", fn=self._log_event),
                _Registered("count", fn=self._count_event),
            ]
            self._hooks[event][:0] = defaults

    async def _log_event(self, hook_event: HookEvent) -> None:
        details = " ".join(f"{k}={v}" for k, v in hook_event.details.items())
        log.info("hook %s model %s %s", hook_event.event, hook_event.model, details)

    async def _count_event(self, hook_event: HookEvent) -> None:
        self.counts[hook_event.event] += 1

    async def fire(self, event: str, model: str, **details: Any) -> None:
        """Run every hook of ``event``, in order. For a pre-event the first failure raises
        ``HookError`` and later hooks do not run; other events log failures and go on."""
        self._check_event(event)
        hook_event = HookEvent(event, model, details)
        for hook in list(self._hooks[event]):
            problem = await self._run(hook, hook_event)
            if problem is None:
                continue
            self.failures[event] += 1
            if event in PRE_EVENTS:
                log.warning("hook %s %s refused model %s: %s", event, hook.name, model, problem)
                raise HookError(event, model, hook.name, problem)
            log.warning("hook %s %s failed for model %s: %s", event, hook.name, model, problem)

    async def _run(self, hook: _Registered, hook_event: HookEvent) -> str | None:
        """None when the hook succeeded, else one line saying why it failed."""
        if hook.command is not None:
            return await self._run_command(hook.command, hook_event)
        assert hook.fn is not None
        fn = hook.fn
        try:
            with trio.fail_after(self.timeout):
                if inspect.iscoroutinefunction(fn):
                    await fn(hook_event)
                else:
                    result = await trio.to_thread.run_sync(fn, hook_event, abandon_on_cancel=True)
                    if inspect.isawaitable(result):
                        await result
        except trio.TooSlowError:
            return f"did not finish within {self.timeout:g}s"
        except Exception as exc:  # a hook is user code: any failure is its message
            return _one_line(str(exc)) or type(exc).__name__
        return None

    async def _run_command(self, command: str, hook_event: HookEvent) -> str | None:
        env = {**os.environ, **hook_event.env()}
        try:
            with trio.fail_after(self.timeout):
                proc = await trio.run_process(
                    ["/bin/sh", "-c", command],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        except trio.TooSlowError:
            return f"did not finish within {self.timeout:g}s (killed)"
        except OSError as exc:
            return f"could not start /bin/sh: {exc.strerror or exc}"
        if proc.returncode == 0:
            return None
        return _last_line(proc.stderr) or f"exited with status {proc.returncode}"

    def status(self) -> dict[str, Any]:
        return {
            "hooks": self.listing(),
            "counts": dict(self.counts),
            "failures": dict(self.failures),
        }


def setup_default_hooks(hooks: Hooks) -> Hooks:
    """Install the logging and counting hooks on ``hooks``; returns it."""
    hooks.setup_default_hooks()
    return hooks


__all__ = [
    "EVENTS",
    "PRE_EVENTS",
    "HookError",
    "HookEvent",
    "HookFn",
    "Hooks",
    "setup_default_hooks",
]
