"""A fix for executing notebooks with widgets under papermill, applied in the runner's worker processes.

nbclient waits for a cell's ``execute_reply`` with ``shell_channel.get_msg(timeout=None)``, and that wait can miss
a reply that has already arrived: the cell never finishes although the kernel is idle (nbclient issue #312, seen
here on a widget cell of notebook 04 that had run in 0.1 s in the previous run). :func:`poll_shell_in_slices`
makes every untimed wait a loop of :data:`SLICE`-second waits, each of which looks at the socket again (the fix
proposed upstream in nbclient PR #311); a timed wait is unchanged.
"""

from __future__ import annotations

from queue import Empty

__all__ = ["SLICE", "poll_shell_in_slices"]

SLICE = 5.0
"""Seconds of one slice of an untimed wait for a shell reply."""


def poll_shell_in_slices() -> None:
    """Patch ``jupyter_client``'s asyncio shell channel (in this process) so untimed ``get_msg`` waits in slices."""
    from jupyter_client.channels import AsyncZMQSocketChannel

    if getattr(AsyncZMQSocketChannel.get_msg, "_lora_lens", False):
        return
    original = AsyncZMQSocketChannel.get_msg

    async def get_msg(self, timeout=None):
        if timeout is not None:
            return await original(self, timeout=timeout)
        while True:
            try:
                return await original(self, timeout=SLICE)
            except Empty:
                continue

    get_msg._lora_lens = True
    AsyncZMQSocketChannel.get_msg = get_msg
