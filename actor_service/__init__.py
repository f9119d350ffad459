"""tbrm actor_service package."""
