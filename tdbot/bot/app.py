"""The Telegram bot inside the daemon: a python-telegram-bot `Application` on its loop.

`ChatBot.start` initialises the Application (getMe checks the token), sets the
command menu, and starts long polling; `ChatBot.stop` undoes it in reverse. PTB's
`run_polling` is not used, because it owns the event loop that the daemon already runs.

Every update first passes the allowlist gate (handler group -1): an update from a
user or chat not on the allowlist is answered with a rejection, logged, counted, and
stopped there. Replies are rendered by `render_chunks`, so they are HTML-escaped and
split under Telegram's 4,096-character limit. `AIORateLimiter` spaces the requests
and waits out a 429 response's retry_after before it sends again.

Neither the bot, a request URL nor the token is ever logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from telegram import (
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    Update,
)
from telegram.constants import ParseMode
from telegram.error import BadRequest, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from tdbot.alerts import silence
from tdbot.alerts.messages import is_keep_callback
from tdbot.bot.access import REJECTION_TEXT, Allowlist
from tdbot.bot.arguments import UsageError
from tdbot.bot.chat_actions import ChatActions, ask_deploy, deploy_decisions_awaiting
from tdbot.bot.commands import (
    COMMANDS,
    SPECS,
    CommandRequest,
    Commands,
    Photo,
    TickLog,
    usage_message,
)
from tdbot.bot.confirmations import (
    Answer,
    Confirmations,
    closed_message,
    is_confirmation_callback,
    parse_callback,
)
from tdbot.bot.idle_warnings import IdleWarningButtons
from tdbot.bot.views import error_message, moment
from tdbot.daemon.engine import TickResult
from tdbot.logsafe import redact
from tdbot.notify.base import Button, Message, NotifyError
from tdbot.notify.telegram import render_chunks
from tdbot.rules.schema import RuleBase
from tdbot.store.tables import ConfirmationRecord

if TYPE_CHECKING:
    from tdbot.daemon.runner import Daemon

logger = logging.getLogger("tdbot.bot")

# Seconds one getUpdates long poll waits for news; stopping the bot waits for it too.
DEFAULT_POLL_TIMEOUT_SECONDS = 10
# Retries of one request after a 429 response; AIORateLimiter waits retry_after first.
FLOOD_RETRIES = 2
ERROR_REPLY = "Sorry, that failed ({error}). The details are in the daemon log."

CommandMethod = Callable[[CommandRequest], Awaitable[Message | Photo]]
BotApplication = Application[Any, ContextTypes.DEFAULT_TYPE, Any, Any, Any, Any]


class BotStartError(Exception):
    """The bot could not start, for example because the token was rejected."""


class ChatBot:
    """Chat commands and confirmation buttons for one running daemon."""

    def __init__(
        self,
        daemon: Daemon,
        token: str,
        *,
        poll_timeout_seconds: int = DEFAULT_POLL_TIMEOUT_SECONDS,
    ) -> None:
        settings = daemon.settings.telegram
        if daemon.executor is None:
            raise ValueError("the daemon has no action executor, so the bot cannot act")
        self._daemon = daemon
        self._token = token
        self._poll_timeout = poll_timeout_seconds
        self.allowlist = Allowlist.of(settings.allowed_user_ids, settings.command_chat_ids)
        self.confirmations = Confirmations(daemon.store, settings.confirmation_ttl)
        self.ticks = TickLog()
        self.actions = ChatActions(
            client=daemon.client,
            store=daemon.store,
            clock=daemon.clock,
            executor=daemon.executor,
            rules=lambda: daemon.rules,
        )
        self.idle_warnings = IdleWarningButtons(
            client=daemon.client,
            store=daemon.store,
            clock=daemon.clock,
            confirmations=self.confirmations,
            rules=lambda: daemon.rules,
        )
        self.commands = Commands(
            daemon,
            allowlist=self.allowlist,
            confirmations=self.confirmations,
            ticks=self.ticks,
        )
        self._app: BotApplication | None = None

    def __repr__(self) -> str:
        return f"ChatBot(allowed_users={sorted(self.allowlist.user_ids)!r})"

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Check the token, set the command menu and start polling; raise BotStartError."""
        app = self._build()
        try:
            await app.initialize()
            await app.bot.set_my_commands(
                [BotCommand(spec.name, spec.description) for spec in COMMANDS]
            )
            await app.start()
            assert app.updater is not None
            await app.updater.start_polling(
                poll_interval=0,
                timeout=self._poll_timeout,
                allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY],
            )
        except TelegramError as error:
            reason = self._describe(error)
            logger.error("Telegram bot failed to start: %s", reason)
            await _shutdown_quietly(app)
            raise BotStartError(f"Telegram bot failed to start: {reason}") from None

        self._app = app
        self._daemon.tick_listeners.append(self.on_tick)
        if not self.allowlist.user_ids:
            logger.warning("telegram.allowed_user_ids is empty, so every command is rejected")
        logger.info(
            "Telegram chat commands started for %d users in private chats and %d group chats",
            len(self.allowlist.user_ids),
            len(self.allowlist.chat_ids),
        )

    async def stop(self) -> None:
        """Stop polling, let running handlers finish, and close the connections."""
        app, self._app = self._app, None
        if app is None:
            return
        if self.on_tick in self._daemon.tick_listeners:
            self._daemon.tick_listeners.remove(self.on_tick)
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        await app.stop()
        await app.shutdown()
        logger.info("Telegram chat commands stopped")

    def _build(self) -> BotApplication:
        builder = (
            ApplicationBuilder()
            .token(self._token)
            .rate_limiter(AIORateLimiter(max_retries=FLOOD_RETRIES))
            .concurrent_updates(True)
            .job_queue(None)
        )
        base_url = self._daemon.settings.telegram.base_url
        if base_url:
            builder = builder.base_url(base_url)
        app: BotApplication = builder.build()

        app.add_handler(TypeHandler(Update, self._gate), group=-1)
        for spec in COMMANDS:
            app.add_handler(CommandHandler(spec.name, self._command(spec.name)))
        app.add_handler(CommandHandler("start", self._command("help")))
        app.add_handler(CallbackQueryHandler(self._button))
        app.add_handler(MessageHandler(filters.COMMAND, self._unknown_command))
        app.add_error_handler(self._on_error)
        return app

    def _describe(self, error: BaseException) -> str:
        return redact(f"{type(error).__name__}: {error}", [self._token])

    # --- allowlist -------------------------------------------------------------------

    async def _gate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Stop every update from a user or chat not on the allowlist, with a rejection."""
        user, chat = update.effective_user, update.effective_chat
        user_id = user.id if user is not None else None
        chat_id = chat.id if chat is not None else None
        if self.allowlist.allows(user_id, chat_id, chat.type if chat is not None else None):
            return

        query = update.callback_query
        self.allowlist.record_rejection(user_id, chat_id, "button" if query else "message")
        if query is not None:
            await query.answer(REJECTION_TEXT, show_alert=True)
        elif chat_id is not None:
            await context.bot.send_message(chat_id, REJECTION_TEXT)
        raise ApplicationHandlerStop

    # --- commands --------------------------------------------------------------------

    def _command(
        self, name: str
    ) -> Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]:
        spec = SPECS[name]

        async def handle(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            request = _request(update)
            if request is None:
                return
            method: CommandMethod = getattr(self.commands, name)
            logger.info("user %d in chat %d: /%s", request.user_id, request.chat_id, name)
            try:
                reply = await method(request)
            except UsageError as problem:
                reply = usage_message(spec, str(problem))
            if isinstance(reply, Photo):
                await self._bot().send_photo(request.chat_id, reply.png, caption=reply.caption)
            else:
                await self.send(request.chat_id, reply)

        return handle

    async def _unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        request = _request(update)
        message = update.effective_message
        if request is None or message is None or message.text is None:
            return
        command = message.text.split(maxsplit=1)[0]
        reply = error_message(f"Unknown command {command}. /help lists the commands.")
        await self.send(request.chat_id, reply)

    async def send(self, chat_id: int, message: Message) -> None:
        """Send `message` to a chat in chunks under the size limit, buttons under the last."""
        bot = self._bot()
        chunks = render_chunks(message)
        markup = _keyboard(message.buttons)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            await bot.send_message(
                chat_id,
                chunk,
                parse_mode=ParseMode.HTML,
                reply_markup=markup if last else None,
                link_preview_options=LinkPreviewOptions(is_disabled=True),
            )

    def _bot(self) -> Any:
        if self._app is None:
            raise RuntimeError("the Telegram bot is not started")
        return self._app.bot

    # --- buttons ---------------------------------------------------------------------

    async def _button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Route a button press: confirmations, alert silences, idle warnings, or unknown."""
        query = update.callback_query
        user = update.effective_user
        if query is None or user is None:
            return
        data = query.data or ""
        if is_confirmation_callback(data):
            await self._confirmation_button(update, data, user.id)
        elif data.startswith(f"{silence.CALLBACK_PREFIX}:"):
            text = await silence.handle_alert_button(
                self._daemon.store, data, user.id, self._daemon.clock.now()
            )
            await query.answer(text)
        elif is_keep_callback(data):
            await self._idle_warning_button(update, data, user.id)
        else:
            logger.warning("unknown button data %r from user %d", data[:64], user.id)
            await query.answer("This button is not known to this bot, so nothing was done.")

    async def _idle_warning_button(self, update: Update, data: str, user_id: int) -> None:
        """Keep a warned VM longer, or ask to confirm its stop, from an idle warning's button."""
        query = update.callback_query
        assert query is not None
        chat = update.effective_chat
        chat_id = chat.id if chat is not None else None
        reply = await self.idle_warnings.press(data, user_id=user_id, chat_id=chat_id)
        await query.answer(reply.answer)
        if reply.question is not None:
            await self.send(chat_id if chat_id is not None else user_id, reply.question)

    async def _confirmation_button(self, update: Update, data: str, user_id: int) -> None:
        query = update.callback_query
        assert query is not None
        chat = update.effective_chat
        parsed = parse_callback(data)
        record = None if parsed is None else await self._daemon.store.get_confirmation(parsed[0])
        if parsed is None or record is None:
            await query.answer("This confirmation is not known, so nothing was done.")
            return
        chat_id = chat.id if chat is not None else None
        refusal = _refusal(record, user_id, chat_id)
        if refusal is not None:
            await query.answer(refusal, show_alert=True)
            return

        # 1. Claim the row: only one press of one button ever gets past this.
        now = self._daemon.clock.now()
        if not await self._daemon.store.claim_confirmation(record.id, now=now):
            await self._answer_unclaimed(update, record)
            return

        # 2. Cancel, or confirm and act on a state checked again.
        if parsed[1] is Answer.CANCEL:
            await self._daemon.store.finish_confirmation(record.id, "cancelled")
            logger.info("confirmation %s cancelled by user %d", record.id, user_id)
            await query.answer("Cancelled; nothing was done.")
            await self._close(update, record, f"Cancelled by user {user_id}; nothing was done.")
            return
        await query.answer("Confirmed; working on it.")
        await self._close(update, record, f"Confirmed by user {user_id}.")
        logger.info("confirmation %s confirmed by user %d", record.id, user_id)
        try:
            result = await self.actions.carry_out(record, user_id)
        finally:
            # Stored even when the action raised, so the row never looks pending.
            await self._daemon.store.finish_confirmation(record.id, "confirmed")
        await self.send(chat_id if chat_id is not None else user_id, Message(title=result))

    async def _answer_unclaimed(self, update: Update, record: ConfirmationRecord) -> None:
        """Tell the presser why nothing happens: the question was used or has expired."""
        query = update.callback_query
        assert query is not None
        current = await self._daemon.store.get_confirmation(record.id) or record
        if current.used_at is not None:
            outcome = f" ({current.outcome})" if current.outcome else ""
            await query.answer(f"This confirmation was already used{outcome}, so nothing was done.")
            return
        await query.answer("This confirmation has expired; nothing was done. Ask again.")
        await self._close(
            update, current, f"Expired at {moment(current.expires_at)}; nothing was done."
        )

    async def _close(self, update: Update, record: ConfirmationRecord, note: str) -> None:
        """Replace the question's text with its outcome and remove its buttons."""
        query = update.callback_query
        if query is None or query.message is None:
            return
        text = render_chunks(closed_message(record, note))[0]
        try:
            await query.edit_message_text(text, parse_mode=ParseMode.HTML)
        except BadRequest as error:
            # A second press on an expired question edits in the same text again, which
            # Telegram rejects as "message is not modified"; the message is right already.
            if "not modified" in str(error).lower():
                logger.debug("confirmation %s already shows its outcome", record.id)
                return
            logger.warning("could not edit confirmation %s: %s", record.id, self._describe(error))
        except TelegramError as error:
            # The message may be too old to edit; the answer was sent already.
            logger.warning("could not edit confirmation %s: %s", record.id, self._describe(error))

    # --- rule decisions that wait for a confirmation -------------------------------------

    async def on_tick(self, rule: RuleBase, result: TickResult) -> None:
        """Note the tick's time, and ask for confirmation of each deploy held back."""
        now = self._daemon.clock.now()
        self.ticks.finished_at[rule.name] = now
        for decision in deploy_decisions_awaiting(result.outcomes):
            store = self._daemon.store
            pending = await store.open_confirmation(
                origin=rule.name, action="deploy", subject=decision.vm_name, now=now
            )
            if pending is not None:
                continue
            record = await self.confirmations.create(
                ask_deploy(rule, decision), origin=rule.name, now=now
            )
            logger.info("rule %s: asking to confirm deploy %s", rule.name, decision.vm_name)
            try:
                await self._daemon.notifier.send(self.confirmations.question_message(record))
            except NotifyError as error:
                logger.error("confirmation %s of rule %s not sent: %s", record.id, rule.name, error)

    # --- errors ----------------------------------------------------------------------

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log a handler's failure without the token, and tell the user it failed."""
        error = context.error
        update_id = update.update_id if isinstance(update, Update) else None
        logger.error(
            "handling update %s failed: %s",
            update_id,
            self._describe(error) if error is not None else "unknown error",
            exc_info=error,
        )
        if not isinstance(update, Update) or update.effective_chat is None:
            return
        name = type(error).__name__ if error is not None else "unknown error"
        try:
            await self.send(update.effective_chat.id, error_message(ERROR_REPLY.format(error=name)))
        except TelegramError as send_error:
            logger.error("the error reply failed too: %s", self._describe(send_error))


def _request(update: Update) -> CommandRequest | None:
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    if user is None or chat is None or message is None or message.text is None:
        return None
    parts = message.text.split(maxsplit=1)
    return CommandRequest(chat.id, user.id, parts[1] if len(parts) > 1 else "")


def _refusal(record: ConfirmationRecord, user_id: int, chat_id: int | None) -> str | None:
    """Say why this user may not answer this question, or None when they may."""
    if record.user_id is not None and record.user_id != user_id:
        return "Only the user who asked can answer this confirmation."
    if record.chat_id is not None and record.chat_id != chat_id:
        return "This confirmation belongs to another chat."
    return None


def _keyboard(rows: tuple[tuple[Button, ...], ...]) -> InlineKeyboardMarkup | None:
    if not rows:
        return None
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(b.text, callback_data=b.callback_data) for b in row] for row in rows]
    )


async def _shutdown_quietly(app: BotApplication) -> None:
    try:
        if app.running:
            await app.stop()
        await app.shutdown()
    except (TelegramError, RuntimeError) as error:
        logger.debug("Telegram bot shutdown after a failed start: %s", type(error).__name__)
