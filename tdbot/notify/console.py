"""Print notifications to a terminal or a log file."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from tdbot.notify.base import Message

if TYPE_CHECKING:
    from rich.console import Console

_SEVERITY_STYLES = {"info": "bold cyan", "warning": "bold yellow", "critical": "bold red"}


class ConsoleNotifier:
    """Print one block per message: a severity and title line, then the indented body.

    `color=None` colors only when `stream` is a TTY; otherwise the text is plain.
    rich is imported on first use, so importing this module stays cheap.
    """

    def __init__(self, stream: TextIO = sys.stdout, color: bool | None = None) -> None:
        self._stream = stream
        self._color = color
        self._console: Console | None = None

    async def start(self) -> None:
        return None

    async def send(self, message: Message) -> None:
        from rich.text import Text

        console = self._get_console()
        header = Text(f"{message.severity.upper():<8} ", style=_SEVERITY_STYLES[message.severity])
        header.append(message.title, style="bold")
        console.print(header, soft_wrap=True)
        for line in message.lines:
            console.print(Text(f"    {line}"), soft_wrap=True)
        for row in message.buttons:
            labels = " ".join(f"[{button.text}]" for button in row)
            console.print(Text(f"    {labels}", style="dim"), soft_wrap=True)
        console.print()

    async def stop(self) -> None:
        self._stream.flush()

    def _get_console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            color = self._stream.isatty() if self._color is None else self._color
            self._console = Console(
                file=self._stream,
                force_terminal=color,
                no_color=not color,
                color_system="auto" if color else None,
                highlight=False,
                emoji=False,
            )
        return self._console
