"""The nbclient wait fix: an untimed wait for a kernel message looks at the socket again every slice."""

from __future__ import annotations

import asyncio

from jupyter_client.channels import AsyncZMQSocketChannel

from lora_lens.workshop import execution


class FakeSocket:
    def __init__(self):
        self.polls = []

    async def poll(self, timeout_ms):
        self.polls.append(timeout_ms)
        return len(self.polls) >= 3  # "missed" twice, then the message is seen


class FakeChannel:
    def __init__(self):
        self.socket = FakeSocket()

    async def _recv(self):
        return {"msg": "execute_reply"}


def test_untimed_get_msg_polls_in_slices(monkeypatch):
    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", AsyncZMQSocketChannel.get_msg)  # restored afterwards
    monkeypatch.setattr(execution, "SLICE", 0.01)
    execution.poll_shell_in_slices()
    execution.poll_shell_in_slices()  # idempotent
    channel = FakeChannel()
    assert asyncio.run(AsyncZMQSocketChannel.get_msg(channel)) == {"msg": "execute_reply"}
    assert channel.socket.polls == [10, 10, 10]
    timed = FakeChannel()
    timed.socket.polls = [0, 0]  # ready at once
    assert asyncio.run(AsyncZMQSocketChannel.get_msg(timed, timeout=2)) == {"msg": "execute_reply"}
    assert timed.socket.polls[-1] == 2000
