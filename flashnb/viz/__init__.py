"""flashnb's figures for the notebooks; `flashnb.viz.style` is the visual language they all share.

    flashnb.viz.style     colours per technique / layout / latency component, measured-modeled-paper marks
    flashnb.viz.flash     disk throughput, Table 2, bundling (notebook 01)
    flashnb.viz.sparsity  sparsity, activity, reuse, predictor quality, closest friends (notebook 02)
    flashnb.viz.engine    window previews, bundled vs unbundled, memory management (notebooks 03-05)
    flashnb.viz.tour      end-to-end latency and the quick tour (notebooks 00, 06, 07)

Every function draws results that flashnb.lab (or the engine's records) computed, runs nothing itself and
returns a plain `go.Figure`; the sliders that redraw them live in `flashnb.widgets`.
"""
