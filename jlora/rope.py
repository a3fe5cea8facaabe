"""Moved to jlora.models.rope; these names stay importable from here."""
from jlora.models.rope import apply_rotary as apply_rotary
from jlora.models.rope import cos_sin as cos_sin
from jlora.models.rope import inverse_frequencies as inverse_frequencies
from jlora.models.rope import rope_tables as rope_tables
