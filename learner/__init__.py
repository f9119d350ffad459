"""tbrm learner package."""
