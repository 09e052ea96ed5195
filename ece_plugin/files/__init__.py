"""What touches the user's disk besides the method's own caches: edit files (``editfile``) and model folders
(``modeldir``)."""
