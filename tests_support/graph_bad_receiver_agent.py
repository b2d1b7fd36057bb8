"""An agent module that fails at import: its receiver names an undeclared signal."""
from typing import Any

from microagent import MicroAgent, receiver


class Misspelt(MicroAgent):
    @receiver('graph_chk_never_declared')
    async def on_signal(self, **kwargs: Any) -> None:
        pass
