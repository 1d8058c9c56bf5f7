"""Weight sources, key maps (data tables) and strict loading."""
