"""tbrm deploy package."""
