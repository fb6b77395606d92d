"""Command palette (Ctrl+P) entries for the chat actions."""

from __future__ import annotations

from textual.command import DiscoveryHit, Hit, Hits, Provider

# (title, help, app action); chat_action runs an action of the chat screen whichever screen is on top.
PALETTE_ACTIONS = (
    ("Stop the reply", "Stop the reply or document being read (Escape)", "chat_action('stop')"),
    ("Regenerate the last reply", "Ctrl+R", "chat_action('regenerate')"),
    (
        "Undo the last exchange",
        "Drop the last question and answer from memory (Ctrl+B)",
        "chat_action('undo')",
    ),
    ("Toggle the memory inspector", "F2", "chat_action('toggle_inspector')"),
    (
        "Sessions",
        "Open, create, rename, delete, export sessions; restore snapshots (F3)",
        "chat_action('sessions')",
    ),
    ("New session", "Start a new conversation with an empty memory (Ctrl+N)", "chat_action('new_session')"),
    ("Save a snapshot now", "Ctrl+S", "chat_action('save')"),
    ("Export as Markdown", "Write the conversation to a .md file", "chat_action('export(\"markdown\")')"),
    ("Export as JSONL", "Write the conversation to a .jsonl file", "chat_action('export(\"jsonl\")')"),
    ("Copy the last reply", "OSC 52 clipboard", "chat_action('copy')"),
    ("Help", "Keys and slash commands (F1)", "help"),
)


class LolaCommands(Provider):
    def _callback(self, action: str):
        async def run() -> None:
            await self.app.run_action(action)

        return run

    async def discover(self) -> Hits:
        for title, help_text, action in PALETTE_ACTIONS:
            yield DiscoveryHit(title, self._callback(action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action in PALETTE_ACTIONS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), self._callback(action), help=help_text)
