"""tbrm buffer package."""
