"""Notifiers, and the fake Bot API server they are tested against.

The Telegram notifier and PTB's own Bot and Application talk HTTP over 127.0.0.1 to
`FakeTelegramApi`; nothing reaches Telegram.
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import telegram
from telegram.ext import ApplicationBuilder, CallbackQueryHandler, CommandHandler, ContextTypes

from tdbot.logsafe import install_redaction
from tdbot.notify.base import Button, Message, MultiNotifier, NotifyError
from tdbot.notify.console import ConsoleNotifier
from tdbot.notify.telegram import MESSAGE_LIMIT, TelegramNotifier, render_chunks, text_length
from tests.fakes.telegram_api import FakeTelegramApi

# PTB 22.8's own RetryAfter constructor reads retry_after as an int, which warns.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*retry_after.*:telegram.warnings.PTBDeprecationWarning"
)

WRONG_TOKEN = "987654321:WrongTokenWrongTokenWrongToken12345"
HOSTILE_NAME = "<b>&_*["


@pytest.fixture
async def api() -> AsyncIterator[FakeTelegramApi]:
    async with FakeTelegramApi() as server:
        yield server


@pytest.fixture
async def notifier(api: FakeTelegramApi) -> AsyncIterator[TelegramNotifier]:
    sender = TelegramNotifier(api.token, [42], base_url=api.base_url)
    await sender.start()
    yield sender
    await sender.stop()


def _unescape_chunks(chunks: list[str]) -> str:
    return "".join(html.unescape(chunk) for chunk in chunks)


# --- rendering ---------------------------------------------------------------------


def test_render_escapes_title_and_lines() -> None:
    message = Message(title=f"VM {HOSTILE_NAME}", lines=(f"name {HOSTILE_NAME}",))

    (chunk,) = render_chunks(message)

    assert chunk == "<b>ℹ️ VM &lt;b&gt;&amp;_*[</b>\nname &lt;b&gt;&amp;_*["


def test_render_splits_at_lines() -> None:
    lines = tuple(f"line {i:04d} " + "x" * 40 for i in range(300))

    chunks = render_chunks(Message(title="many", lines=lines))

    assert len(chunks) > 1
    assert all(text_length(chunk) <= MESSAGE_LIMIT for chunk in chunks)
    rejoined = "\n".join(chunks).split("\n")
    assert rejoined[1:] == list(lines)


def test_render_cuts_long_line_between_entities() -> None:
    line = "&<" * 3000

    chunks = render_chunks(Message(title="t", lines=(line,)), limit=100)

    assert all(text_length(chunk) <= 100 for chunk in chunks)
    assert _unescape_chunks(chunks[1:]) == line


def test_render_counts_utf16_units() -> None:
    # Each emoji outside the Basic Multilingual Plane is two UTF-16 code units.
    chunks = render_chunks(Message(title="t", lines=("😀" * 60,)), limit=50)

    assert all(text_length(chunk) <= 50 for chunk in chunks)


def test_button_rejects_long_callback_data() -> None:
    with pytest.raises(ValueError, match="65 bytes"):
        Button("stop", "x" * 65)


# --- Telegram notifier -------------------------------------------------------------


async def test_telegram_escapes_vm_name(api: FakeTelegramApi, notifier: TelegramNotifier) -> None:
    await notifier.send(
        Message(
            title=f"VM {HOSTILE_NAME} is idle",
            lines=(f"{HOSTILE_NAME} used 0% GPU for 2h",),
            severity="warning",
        )
    )

    (sent,) = api.messages
    assert sent.chat_id == 42
    assert sent.parse_mode == "HTML"
    assert "VM &lt;b&gt;&amp;_*[ is idle" in (sent.text or "")
    assert "&lt;b&gt;&amp;_*[ used 0% GPU for 2h" in (sent.text or "")


async def test_telegram_splits_long_message(
    api: FakeTelegramApi, notifier: TelegramNotifier
) -> None:
    lines = tuple(f"{i:04d} {HOSTILE_NAME} " + "y" * 60 for i in range(200))

    await notifier.send(Message(title="report", lines=lines))

    texts = api.texts(42)
    assert len(texts) > 1
    assert all(len(text) <= MESSAGE_LIMIT for text in texts)
    delivered = html.unescape("\n".join(texts)).split("\n")
    assert delivered[1:] == list(lines)


async def test_telegram_honours_retry_after(
    api: FakeTelegramApi, notifier: TelegramNotifier
) -> None:
    api.rate_limit_next("sendMessage", retry_after=1)
    started = time.monotonic()

    await notifier.send(Message(title="after flood control"))

    assert time.monotonic() - started >= 1.0
    assert len(api.calls_of("sendMessage")) == 2
    assert api.texts() == ["<b>ℹ️ after flood control</b>"]


async def test_telegram_second_flood_raises(
    api: FakeTelegramApi, notifier: TelegramNotifier
) -> None:
    api.rate_limit_next("sendMessage", times=2, retry_after=1)

    with pytest.raises(NotifyError, match="again after one retry"):
        await notifier.send(Message(title="flooded"))

    assert api.messages == []


async def test_telegram_retry_after_over_bound(api: FakeTelegramApi) -> None:
    sender = TelegramNotifier(api.token, [42], base_url=api.base_url, max_retry_after=5)
    api.rate_limit_next("sendMessage", retry_after=120)
    started = time.monotonic()

    with pytest.raises(NotifyError, match="wait 120 s"):
        await sender.send(Message(title="flooded"))

    assert time.monotonic() - started < 5
    await sender.stop()


async def test_telegram_unknown_token_raises(
    api: FakeTelegramApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    install_redaction([])
    sender = TelegramNotifier(WRONG_TOKEN, [42], base_url=api.base_url)

    with pytest.raises(NotifyError) as start_error:
        await sender.start()
    with pytest.raises(NotifyError) as send_error:
        await sender.send(Message(title="never delivered"))
    await sender.stop()

    assert "InvalidToken" in str(start_error.value)
    assert "chat 42 failed: InvalidToken: Unauthorized" in str(send_error.value)
    assert WRONG_TOKEN not in str(start_error.value)
    assert WRONG_TOKEN not in str(send_error.value)
    assert WRONG_TOKEN not in repr(sender)
    assert WRONG_TOKEN not in caplog.text
    assert "Unauthorized" in caplog.text


async def test_telegram_blocked_chat_continues(api: FakeTelegramApi) -> None:
    api.blocked_chats.add(42)
    sender = TelegramNotifier(api.token, [42, 43], base_url=api.base_url)

    with pytest.raises(NotifyError, match=r"chats \[42\]"):
        await sender.send(Message(title="to both chats"))

    assert [m.chat_id for m in api.messages] == [43]
    await sender.stop()


async def test_telegram_buttons_under_last_chunk(
    api: FakeTelegramApi, notifier: TelegramNotifier
) -> None:
    buttons = ((Button("Keep 1 h", "keep:vm-1:1h"), Button("Stop now", "stop:vm-1")),)
    lines = tuple("z" * 100 for _ in range(60))

    await notifier.send(Message(title="idle", lines=lines, buttons=buttons))

    markups = [m.reply_markup for m in api.messages]
    assert markups[:-1] == [None] * (len(markups) - 1)
    assert markups[-1] == {
        "inline_keyboard": [
            [
                {"text": "Keep 1 h", "callback_data": "keep:vm-1:1h"},
                {"text": "Stop now", "callback_data": "stop:vm-1"},
            ]
        ]
    }


async def test_telegram_start_logs_username(
    api: FakeTelegramApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tdbot")
    sender = TelegramNotifier(api.token, [42], base_url=api.base_url)

    await sender.start()
    await sender.stop()

    assert "@tdbot_test_bot started for 1 chats" in caplog.text
    assert api.calls_of("getMe")


def test_telegram_rejects_no_chats() -> None:
    with pytest.raises(ValueError, match="chat_ids is empty"):
        TelegramNotifier(WRONG_TOKEN, [])


# --- console notifier --------------------------------------------------------------


async def test_console_plain_block() -> None:
    stream = io.StringIO()
    console = ConsoleNotifier(stream)

    await console.send(
        Message(
            title="VM [gpu-1] idle",
            lines=("GPU 0% for 2h", "stopping at 14:00 UTC"),
            severity="warning",
            buttons=((Button("Keep 1 h", "keep"),),),
        )
    )

    assert stream.getvalue() == (
        "WARNING  VM [gpu-1] idle\n    GPU 0% for 2h\n    stopping at 14:00 UTC\n    [Keep 1 h]\n\n"
    )


async def test_console_long_line_unwrapped() -> None:
    stream = io.StringIO()

    await ConsoleNotifier(stream).send(Message(title="t", lines=("w " * 100,)))

    assert f"    {'w ' * 100}".rstrip() in stream.getvalue()


async def test_console_forced_color() -> None:
    stream = io.StringIO()

    await ConsoleNotifier(stream, color=True).send(
        Message(title="low balance", severity="critical")
    )

    assert "\x1b[" in stream.getvalue()
    assert "low balance" in stream.getvalue()


def test_notify_import_is_cheap() -> None:
    code = (
        "import sys, tdbot.notify.console, tdbot.notify.telegram\n"
        "print(sorted(m for m in ('rich', 'telegram') if m in sys.modules))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"


# --- MultiNotifier -----------------------------------------------------------------


async def test_multi_survives_one_failure(
    api: FakeTelegramApi, caplog: pytest.LogCaptureFixture
) -> None:
    api.blocked_chats.add(42)
    stream = io.StringIO()
    multi = MultiNotifier(
        [TelegramNotifier(api.token, [42], base_url=api.base_url), ConsoleNotifier(stream)]
    )

    await multi.start()
    await multi.send(Message(title="balance low"))
    await multi.stop()

    assert "balance low" in stream.getvalue()
    assert "TelegramNotifier send failed" in caplog.text
    assert "bot was blocked by the user" in caplog.text


async def test_multi_all_failed_raises(api: FakeTelegramApi) -> None:
    api.blocked_chats.update({42, 43})
    multi = MultiNotifier(
        [
            TelegramNotifier(api.token, [42], base_url=api.base_url),
            TelegramNotifier(api.token, [43], base_url=api.base_url),
        ]
    )

    with pytest.raises(NotifyError, match="every notifier failed"):
        await multi.send(Message(title="nobody hears this"))
    await multi.stop()


# --- fake Bot API server through PTB -----------------------------------------------


async def test_fake_api_rejects_long_text(api: FakeTelegramApi) -> None:
    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        with pytest.raises(telegram.error.BadRequest, match="too long"):
            await bot.send_message(42, "x" * (MESSAGE_LIMIT + 1))
        await bot.send_message(42, "x" * MESSAGE_LIMIT)

    assert len(api.messages) == 1


async def test_fake_api_rejects_unclosed_tag(api: FakeTelegramApi) -> None:
    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        with pytest.raises(telegram.error.BadRequest, match="end tag"):
            await bot.send_message(42, "<b>unclosed", parse_mode="HTML")
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)unsupported start tag"):
            await bot.send_message(42, "<script>x</script>", parse_mode="HTML")

    assert api.messages == []


async def test_fake_api_unknown_token(api: FakeTelegramApi) -> None:
    bot = telegram.Bot(WRONG_TOKEN, base_url=api.base_url)

    with pytest.raises(telegram.error.InvalidToken):
        await bot.initialize()
    with pytest.raises(telegram.error.InvalidToken, match="Unauthorized"):
        await bot.send_message(42, "never delivered")
    await bot.shutdown()

    assert api.calls == []


async def test_fake_api_edit_and_delete(api: FakeTelegramApi) -> None:
    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        sent = await bot.send_message(42, "first")
        edited = await bot.edit_message_text(
            "<i>second</i>", 42, sent.message_id, parse_mode="HTML"
        )
        with pytest.raises(telegram.error.BadRequest, match="not modified"):
            await bot.edit_message_text("second", 42, sent.message_id)
        assert await bot.delete_message(42, sent.message_id)
        with pytest.raises(telegram.error.BadRequest, match="not found"):
            await bot.delete_message(42, sent.message_id)

    assert isinstance(edited, telegram.Message)
    assert edited.text == "second"
    assert len(api.edits) == 1
    assert api.deleted == [(42, sent.message_id)]


async def test_fake_api_send_photo(api: FakeTelegramApi) -> None:
    picture = b"\x89PNG\r\n\x1a\n" + bytes(range(256))

    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        sent = await bot.send_photo(42, picture, caption="price <b>history</b>", parse_mode="HTML")

    assert sent.photo[-1].file_size == len(picture)
    assert sent.caption == "price history"
    assert api.messages[0].photo == picture
    assert api.messages[0].caption == "price <b>history</b>"


async def test_fake_api_commands_and_webhook(api: FakeTelegramApi) -> None:
    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        assert await bot.set_my_commands([("status", "Show the fleet"), ("silence", "Mute")])
        commands = await bot.get_my_commands()
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)bot_command_invalid"):
            await bot.set_my_commands([("Bad Command", "x")])
        api.inject_message(42, "hello")
        info = await bot.get_webhook_info()
        assert await bot.delete_webhook(drop_pending_updates=True)
        after = await bot.get_webhook_info()
        assert await bot.close()
        assert await bot.log_out()

    assert [c.command for c in commands] == ["status", "silence"]
    assert info.url == ""
    assert info.pending_update_count == 1
    assert after.pending_update_count == 0


async def test_fake_api_long_poll_offsets(api: FakeTelegramApi) -> None:
    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        empty_started = time.monotonic()
        empty = await bot.get_updates(timeout=1)
        waited = time.monotonic() - empty_started

        poll = asyncio.create_task(bot.get_updates(timeout=2))
        await asyncio.sleep(0.1)
        api.inject_message(42, "/status now")
        first = await poll
        again = await bot.get_updates(timeout=0)
        confirmed = await bot.get_updates(offset=first[-1].update_id + 1, timeout=0)

    assert empty == ()
    assert waited >= 0.9
    assert first[0].message is not None
    assert first[0].message.text == "/status now"
    assert first[0].message.entities[0].type == "bot_command"
    assert len(again) == 1
    assert confirmed == ()


async def test_fake_api_flood_envelope(api: FakeTelegramApi) -> None:
    api.rate_limit_next("sendMessage", retry_after=7)

    async with telegram.Bot(api.token, base_url=api.base_url) as bot:
        with pytest.raises(telegram.error.RetryAfter) as caught:
            await bot.send_message(42, "flooded")
        await bot.send_message(42, "after the wait")

    assert "7 seconds" in str(caught.value)
    assert [c.status for c in api.calls_of("sendMessage")] == [429, 200]


async def _reply_status(update: telegram.Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Reply to /status with a button."""
    assert update.effective_chat is not None
    keyboard = telegram.InlineKeyboardMarkup(
        [[telegram.InlineKeyboardButton("Stop now", callback_data="stop:vm-1")]]
    )
    await context.bot.send_message(update.effective_chat.id, "all fine", reply_markup=keyboard)


async def _answer_button(update: telegram.Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Answer a button press."""
    assert update.callback_query is not None
    await update.callback_query.answer(f"got {update.callback_query.data}")


async def test_fake_api_application_polling(api: FakeTelegramApi) -> None:
    application = ApplicationBuilder().token(api.token).base_url(api.base_url).build()
    application.add_handler(CommandHandler("status", _reply_status))
    application.add_handler(CallbackQueryHandler(_answer_button))

    async with application:
        await application.start()
        assert application.updater is not None
        await application.updater.start_polling(poll_interval=0, timeout=1)

        api.inject_message(42, "/status")
        (reply,) = await api.wait_for_messages(1)
        api.inject_callback_query(42, reply.message_id, "stop:vm-1")
        for _ in range(100):
            if api.callback_answers:
                break
            await asyncio.sleep(0.05)

        await application.updater.stop()
        await application.stop()

    assert reply.text == "all fine"
    assert api.callback_answers[0]["text"] == "got stop:vm-1"
