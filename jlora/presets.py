"""Moved to jlora.models.presets (each family file names its presets); these names stay importable from here."""
from jlora.models.presets import PRESETS as PRESETS
from jlora.models.presets import preset_config as preset_config
