"""The Corral SDK data scientists import: submit jobs from notebooks and scripts, follow them, explain them."""
