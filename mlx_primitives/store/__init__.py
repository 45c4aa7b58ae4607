"""Where tuning records live: the user's database and the shipped per-chip exports."""
