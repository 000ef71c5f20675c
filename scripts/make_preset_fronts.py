"""Regenerate cdka_search/data/preset_fronts.json after a change to candidates or scoring.

    python scripts/make_preset_fronts.py

tests/test_fronts.py fails until the shipped file matches a fresh computation.
"""

from cdka_search.fronts import main

if __name__ == "__main__":
    main()
