"""Files: video in and out (video.py), named clips (clips.py), the latent file (latent_file.py) and
atomic output files (outputs.py). Imports nothing above models."""
