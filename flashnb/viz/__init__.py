"""flashnb's figures for the notebooks; `flashnb.viz.style` is the visual language they all share."""
