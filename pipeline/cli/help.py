"""Help formatting shared by the argparse entry points: every option shows its default.

`argparse.ArgumentDefaultsHelpFormatter` appends "(default: X)" to each option; options whose
default is None or False (unset, or a flag) say in their own help what happens without them.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
