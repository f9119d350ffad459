"""tbrm reward package."""
