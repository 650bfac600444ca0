"""The bottom layer: what models/, diffusion/, transport/ and tinyfusion/ share. Imports nothing of ours."""
