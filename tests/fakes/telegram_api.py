"""A fake Telegram Bot API server on 127.0.0.1 for tests.

It serves `/bot<TOKEN>/<method>` with the real response envelopes (`{"ok": true,
"result": ...}` and `{"ok": false, "error_code": ..., "description": ...}`), accepts
parameters the ways the real server does (query string, URL-encoded or multipart form,
JSON body), so python-telegram-bot's own request stack works against it unchanged:

    async with FakeTelegramApi() as api:
        bot = telegram.Bot(api.token, base_url=api.base_url)
        await bot.send_message(42, "<b>hi</b>", parse_mode="HTML")
        assert api.messages[0].text == "<b>hi</b>"

Methods: getMe, sendMessage, editMessageText, deleteMessage, answerCallbackQuery,
getUpdates (long polling), sendPhoto, setMyCommands, getMyCommands, deleteWebhook,
getWebhookInfo, close and logOut. A test can inject user messages and callback
queries for getUpdates, make the next calls of a method fail with an error or with
429 and retry_after, and block chats (403).

It is stricter or simpler than Telegram in known ways: HTML is checked for supported
tags and matching end tags only, no message entities are returned for HTML text,
chats are created on first use, and error descriptions carry no byte offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import html.parser
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tdbot.asgi import RunningServer, start_server

# Shaped like a real token (bot id, colon, 35 characters) so redaction tests match it.
DEFAULT_TOKEN = "123456789:AAFakeTokenForTdbotTests_0123456789"

MESSAGE_LIMIT = 4096
CAPTION_LIMIT = 1024
MAX_UPDATES_PER_CALL = 100

# Parameters sent as JSON text inside form fields, and those that are numbers or flags.
_JSON_PARAMS = {
    "reply_markup",
    "commands",
    "allowed_updates",
    "link_preview_options",
    "entities",
    "caption_entities",
    "scope",
    "reply_parameters",
}
_INT_PARAMS = {"chat_id", "message_id", "offset", "limit", "timeout", "cache_time", "user_id"}
_BOOL_PARAMS = {
    "show_alert",
    "disable_notification",
    "drop_pending_updates",
    "protect_content",
    "disable_web_page_preview",
}

_HTML_TAGS = {
    "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler",
    "a", "code", "pre", "blockquote", "tg-emoji",
}  # fmt: skip

_COMMAND_PATTERN = re.compile(r"[a-z0-9_]{1,32}")


class ApiError(Exception):
    """An error response of the Bot API, raised inside a method handler."""

    def __init__(
        self, error_code: int, description: str, parameters: dict[str, Any] | None = None
    ) -> None:
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters


@dataclass
class ApiCall:
    """One authorized request: the method name as documented, and its parameters."""

    method: str
    params: dict[str, Any]
    status: int = 200


@dataclass
class SentMessage:
    """A message the bot sent with sendMessage or sendPhoto."""

    method: str
    chat_id: int
    message_id: int
    text: str | None
    parse_mode: str | None
    reply_markup: dict[str, Any] | None
    caption: str | None = None
    photo: bytes | None = None


@dataclass
class _Fault:
    error_code: int
    description: str
    parameters: dict[str, Any] | None = None


@dataclass
class _StoredMessage:
    payload: dict[str, Any]
    reply_markup: dict[str, Any] | None = field(default=None)


class FakeTelegramApi:
    """A fake Bot API server for one bot token, started by `async with`.

    `base_url` is in the form PTB's `Bot(base_url=...)` and `ApplicationBuilder().base_url()`
    expect. Long polls wait at most `max_poll_seconds`, whatever timeout a client requests.
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        username: str = "tdbot_test_bot",
        max_poll_seconds: float = 2.0,
    ) -> None:
        self.token = token
        self.username = username
        self.max_poll_seconds = max_poll_seconds
        bot_id = token.split(":", 1)[0]
        self.bot_id = int(bot_id) if bot_id.isdigit() else 1

        self.calls: list[ApiCall] = []
        self.messages: list[SentMessage] = []
        self.edits: list[ApiCall] = []
        self.deleted: list[tuple[int, int]] = []
        self.callback_answers: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.blocked_chats: set[int] = set()

        self._stored: dict[tuple[int, int], _StoredMessage] = {}
        self._message_ids = itertools.count(1)
        self._update_ids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._pending_updates: list[dict[str, Any]] = []
        self._open_queries: set[str] = set()
        self._faults: dict[str, deque[_Fault]] = {}
        self._changed = asyncio.Event()
        self._poll_generation = 0
        self._closing = False

        self._server: RunningServer | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "getme": self._get_me,
            "sendmessage": self._send_message,
            "editmessagetext": self._edit_message_text,
            "deletemessage": self._delete_message,
            "answercallbackquery": self._answer_callback_query,
            "getupdates": self._get_updates,
            "sendphoto": self._send_photo,
            "setmycommands": self._set_my_commands,
            "getmycommands": self._get_my_commands,
            "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info,
            "close": self._return_true,
            "logout": self._return_true,
        }
        self.app = Starlette(
            routes=[Route("/bot{token}/{method}", self._dispatch, methods=["GET", "POST"])]
        )

    # --- lifecycle -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The Bot API URL without the token, such as "http://127.0.0.1:8081/bot"."""
        if self._server is None:
            raise RuntimeError("the fake Telegram API is not started; use it as a context manager")
        return f"{self._server.url}/bot"

    async def __aenter__(self) -> FakeTelegramApi:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Serve on a free port of 127.0.0.1 and return once the server accepts requests."""
        self._server = await start_server(self.app, "127.0.0.1", 0, name="fake-telegram")

    async def stop(self) -> None:
        """End open long polls and stop the server."""
        if self._server is None:
            return
        self._closing = True
        self._notify_changed()
        await self._server.stop()
        self._server = None

    # --- test controls ---------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        times: int = 1,
        error_code: int = 400,
        description: str = "Bad Request: injected failure",
    ) -> None:
        """Fail the next `times` calls of `method` with this error."""
        fault = _Fault(error_code, description)
        self._faults.setdefault(method.lower(), deque()).extend([fault] * times)

    def rate_limit_next(self, method: str, *, times: int = 1, retry_after: int = 1) -> None:
        """Fail the next `times` calls of `method` with 429 and `retry_after` seconds."""
        fault = _Fault(
            429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}
        )
        self._faults.setdefault(method.lower(), deque()).extend([fault] * times)

    def inject_message(
        self,
        chat_id: int,
        text: str,
        *,
        user_id: int | None = None,
        username: str = "test_user",
    ) -> dict[str, Any]:
        """Queue a user's text message for getUpdates and return the update.

        A text starting with "/" carries a bot_command entity, as Telegram adds one.
        """
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": _chat(chat_id),
            "from": _user(user_id if user_id is not None else abs(chat_id), username),
            "text": text,
        }
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            message["entities"] = [
                {"type": "bot_command", "offset": 0, "length": _utf16_length(command)}
            ]
        return self._queue_update({"message": message})

    def inject_callback_query(
        self,
        chat_id: int,
        message_id: int,
        data: str,
        *,
        user_id: int | None = None,
        username: str = "test_user",
    ) -> str:
        """Queue a press of an inline button under a sent message; return the query id."""
        stored = self._stored.get((chat_id, message_id))
        if stored is None:
            raise ValueError(f"no message {message_id} was sent to chat {chat_id}")

        query_id = str(next(self._query_ids))
        self._open_queries.add(query_id)
        query = {
            "id": query_id,
            "from": _user(user_id if user_id is not None else abs(chat_id), username),
            "chat_instance": f"instance-{chat_id}",
            "data": data,
            "message": stored.payload,
        }
        self._queue_update({"callback_query": query})
        return query_id

    def calls_of(self, method: str) -> list[ApiCall]:
        """Return the recorded calls of `method`, in order."""
        return [call for call in self.calls if call.method.lower() == method.lower()]

    def texts(self, chat_id: int | None = None) -> list[str]:
        """Return the text of every sent message, optionally of one chat only."""
        return [
            m.text or m.caption or ""
            for m in self.messages
            if chat_id is None or m.chat_id == chat_id
        ]

    async def wait_for_messages(
        self, count: int, *, timeout_seconds: float = 5.0
    ) -> list[SentMessage]:
        """Wait until at least `count` messages were sent and return all of them."""
        async with asyncio.timeout(timeout_seconds):
            await self._wait_for_change(lambda: len(self.messages) >= count)
        return list(self.messages)

    # --- dispatch ------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> JSONResponse:
        if request.path_params["token"] != self.token:
            return _error_response(ApiError(401, "Unauthorized"))

        method = request.path_params["method"]
        handler = self._handlers.get(method.lower())
        if handler is None:
            return _error_response(ApiError(404, "Not Found"))

        try:
            params = await _read_params(request)
        except ValueError as exc:
            return _error_response(ApiError(400, f"Bad Request: {exc}"))

        call = ApiCall(method, params)
        self.calls.append(call)
        try:
            self._raise_injected_fault(method)
            result = await handler(params)
        except ApiError as exc:
            call.status = exc.error_code
            return _error_response(exc)
        return JSONResponse({"ok": True, "result": result})

    def _raise_injected_fault(self, method: str) -> None:
        faults = self._faults.get(method.lower())
        if faults:
            fault = faults.popleft()
            raise ApiError(fault.error_code, fault.description, fault.parameters)

    # --- methods -------------------------------------------------------------------

    async def _get_me(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "tdbot test",
            "username": self.username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._writable_chat(params)
        text = _required(params, "text")
        parse_mode = params.get("parse_mode")
        _check_text(text, parse_mode, MESSAGE_LIMIT, "message text")

        payload = self._new_bot_message(chat_id, params)
        payload["text"] = _plain_text(text, parse_mode)
        sent = SentMessage(
            "sendMessage",
            chat_id,
            payload["message_id"],
            text,
            parse_mode,
            params.get("reply_markup"),
        )
        self._record_sent(sent, payload)
        return payload

    async def _send_photo(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._writable_chat(params)
        photo = params.get("photo")
        if not isinstance(photo, bytes):
            raise ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        caption = params.get("caption")
        parse_mode = params.get("parse_mode")
        if caption:
            _check_text(caption, parse_mode, CAPTION_LIMIT, "message caption")

        payload = self._new_bot_message(chat_id, params)
        payload["photo"] = [
            {
                "file_id": f"photo-{payload['message_id']}",
                "file_unique_id": f"unique-{payload['message_id']}",
                "width": 640,
                "height": 480,
                "file_size": len(photo),
            }
        ]
        if caption:
            payload["caption"] = _plain_text(caption, parse_mode)
        sent = SentMessage(
            "sendPhoto",
            chat_id,
            payload["message_id"],
            None,
            parse_mode,
            params.get("reply_markup"),
            caption=caption,
            photo=photo,
        )
        self._record_sent(sent, payload)
        return payload

    async def _edit_message_text(self, params: dict[str, Any]) -> dict[str, Any]:
        if "inline_message_id" in params:
            raise ApiError(400, "Bad Request: inline messages are not supported by this fake")
        chat_id = self._writable_chat(params)
        message_id = _required(params, "message_id")
        stored = self._stored.get((chat_id, message_id))
        if stored is None:
            raise ApiError(400, "Bad Request: message to edit not found")

        text = _required(params, "text")
        parse_mode = params.get("parse_mode")
        _check_text(text, parse_mode, MESSAGE_LIMIT, "message text")
        plain = _plain_text(text, parse_mode)
        markup = params.get("reply_markup")
        if plain == stored.payload.get("text") and markup == stored.reply_markup:
            raise ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup "
                "of the message",
            )

        stored.payload = {**stored.payload, "text": plain, "edit_date": int(time.time())}
        stored.reply_markup = markup
        _set_markup(stored.payload, markup)
        self.edits.append(ApiCall("editMessageText", params))
        return stored.payload

    async def _delete_message(self, params: dict[str, Any]) -> bool:
        chat_id = self._writable_chat(params)
        message_id = _required(params, "message_id")
        if self._stored.pop((chat_id, message_id), None) is None:
            raise ApiError(400, "Bad Request: message to delete not found")
        self.deleted.append((chat_id, message_id))
        return True

    async def _answer_callback_query(self, params: dict[str, Any]) -> bool:
        query_id = str(_required(params, "callback_query_id"))
        if query_id not in self._open_queries:
            raise ApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        self._open_queries.discard(query_id)
        self.callback_answers.append(params)
        return True

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = params.get("offset")
        limit = min(max(int(params.get("limit", MAX_UPDATES_PER_CALL)), 1), MAX_UPDATES_PER_CALL)
        timeout = min(float(params.get("timeout", 0)), self.max_poll_seconds)

        # A new poll ends the one before it with 409, as Telegram does.
        self._poll_generation += 1
        generation = self._poll_generation
        self._notify_changed()
        self._confirm_updates(offset)
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wait_for_change(
                        lambda: (
                            bool(self._pending_updates)
                            or self._closing
                            or generation != self._poll_generation
                        )
                    )
        if generation != self._poll_generation:
            raise ApiError(
                409,
                "Conflict: terminated by other getUpdates request; make sure that only one "
                "bot instance is running",
            )
        return self._pending_updates[:limit]

    def _confirm_updates(self, offset: int | None) -> None:
        """Forget updates before `offset`; a negative offset keeps only the last -offset."""
        if offset is None:
            return
        if offset < 0:
            self._pending_updates = self._pending_updates[offset:]
            return
        self._pending_updates = [u for u in self._pending_updates if u["update_id"] >= offset]

    async def _set_my_commands(self, params: dict[str, Any]) -> bool:
        commands = _required(params, "commands")
        for command in commands:
            name = command.get("command", "")
            description = command.get("description", "")
            if not _COMMAND_PATTERN.fullmatch(name) or not 1 <= len(description) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
        self.commands = list(commands)
        return True

    async def _get_my_commands(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.commands)

    async def _delete_webhook(self, params: dict[str, Any]) -> bool:
        if params.get("drop_pending_updates"):
            self._pending_updates.clear()
        return True

    async def _get_webhook_info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending_updates),
        }

    async def _return_true(self, params: dict[str, Any]) -> bool:
        return True

    # --- helpers -------------------------------------------------------------------

    def _writable_chat(self, params: dict[str, Any]) -> int:
        chat_id = _required(params, "chat_id")
        if not isinstance(chat_id, int):
            raise ApiError(400, "Bad Request: chat not found")
        if chat_id in self.blocked_chats:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        return chat_id

    def _new_bot_message(self, chat_id: int, params: dict[str, Any]) -> dict[str, Any]:
        payload = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": _chat(chat_id),
            "from": {
                "id": self.bot_id,
                "is_bot": True,
                "first_name": "tdbot test",
                "username": self.username,
            },
        }
        _set_markup(payload, params.get("reply_markup"))
        return payload

    def _record_sent(self, sent: SentMessage, payload: dict[str, Any]) -> None:
        self._stored[(sent.chat_id, sent.message_id)] = _StoredMessage(payload, sent.reply_markup)
        self.messages.append(sent)
        self._notify_changed()

    def _queue_update(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        self._pending_updates.append(update)
        self._notify_changed()
        return update

    def _notify_changed(self) -> None:
        """Wake every waiter; each checks its own condition again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, predicate: Callable[[], bool]) -> None:
        # No await runs between the check and taking the event, so no change is missed.
        while not predicate():
            await self._changed.wait()


# --- request parsing -------------------------------------------------------------


async def _read_params(request: Request) -> dict[str, Any]:
    """Merge query string and body parameters, decoding typed values from form fields."""
    params: dict[str, Any] = {k: _decode(k, v) for k, v in request.query_params.items()}
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if not body:
        return params

    if content_type.startswith("application/json"):
        decoded = json.loads(body)
        if not isinstance(decoded, dict):
            raise ValueError("the JSON body must be an object")
        params.update(decoded)
    elif content_type.startswith("application/x-www-form-urlencoded"):
        fields = parse_qsl(body.decode(), keep_blank_values=True)
        params.update({k: _decode(k, v) for k, v in fields})
    elif content_type.startswith("multipart/form-data"):
        params.update(_read_multipart(content_type, body))
    return params


def _read_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Parse a multipart/form-data body with the standard library's MIME parser.

    File parts become bytes; a field that is "attach://<name>" is replaced by the bytes
    of the part called <name>.
    """
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(content, bytes):
            continue
        if part.get_filename() is not None:
            files[name] = content
        else:
            fields[name] = _decode(name, content.decode())

    for name, value in list(fields.items()):
        if isinstance(value, str) and value.startswith("attach://"):
            fields[name] = files.pop(value.removeprefix("attach://"), value)
    return {**fields, **files}


def _decode(name: str, value: str) -> Any:
    if name in _JSON_PARAMS:
        return json.loads(value)
    if name in _INT_PARAMS and re.fullmatch(r"-?\d+", value):
        return int(value)
    if name in _BOOL_PARAMS:
        return value.lower() == "true"
    return value


def _required(params: dict[str, Any], name: str) -> Any:
    value = params.get(name)
    if value is None or value == "":
        raise ApiError(400, f"Bad Request: {name} is empty")
    return value


# --- message text ----------------------------------------------------------------


class _HtmlChecker(html.parser.HTMLParser):
    """Collect the plain text of Telegram HTML, rejecting what Telegram cannot parse."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.plain: list[str] = []
        self.open_tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS:
            raise ApiError(
                400, f'Bad Request: can\'t parse entities: Unsupported start tag "{tag}"'
            )
        self.open_tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open_tags or self.open_tags[-1] != tag:
            raise ApiError(400, f'Bad Request: can\'t parse entities: Unexpected end tag "{tag}"')
        self.open_tags.pop()

    def handle_data(self, data: str) -> None:
        self.plain.append(data)


def _plain_text(text: str, parse_mode: str | None) -> str:
    """Return the text a user sees, without the tags of HTML parse mode."""
    if (parse_mode or "").upper() != "HTML":
        return text
    checker = _HtmlChecker()
    checker.feed(text)
    checker.close()
    if checker.open_tags:
        raise ApiError(
            400,
            "Bad Request: can't parse entities: Can't find end tag corresponding to start "
            f'tag "{checker.open_tags[-1]}"',
        )
    return "".join(checker.plain)


def _check_text(text: str, parse_mode: str | None, limit: int, field_name: str) -> None:
    plain = _plain_text(text, parse_mode)
    if not plain.strip():
        raise ApiError(400, f"Bad Request: {field_name} is empty")
    if _utf16_length(plain) > limit:
        noun = "caption" if field_name == "message caption" else "message"
        raise ApiError(400, f"Bad Request: {noun} is too long")


def _utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _set_markup(payload: dict[str, Any], markup: dict[str, Any] | None) -> None:
    if markup and "inline_keyboard" in markup:
        payload["reply_markup"] = markup
    else:
        payload.pop("reply_markup", None)


def _chat(chat_id: int) -> dict[str, Any]:
    if chat_id > 0:
        return {"id": chat_id, "type": "private", "first_name": "Test"}
    kind = "supergroup" if str(chat_id).startswith("-100") else "group"
    return {"id": chat_id, "type": kind, "title": "Test group"}


def _user(user_id: int, username: str) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": "Test", "username": username}


def _error_response(error: ApiError) -> JSONResponse:
    body: dict[str, Any] = {
        "ok": False,
        "error_code": error.error_code,
        "description": error.description,
    }
    if error.parameters:
        body["parameters"] = error.parameters
    return JSONResponse(body, status_code=error.error_code)
