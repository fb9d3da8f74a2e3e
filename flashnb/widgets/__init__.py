"""flashnb's interactive pieces for the notebooks: ipywidgets sliders that redraw a figure or a line
of text from numbers computed once.

One module per lesson, beside the figures of `flashnb.viz` it redraws:

    flashnb.widgets.flash     read_time_widget: chunk size x reads in flight -> seconds to read 1 GB (notebook 01)
    flashnb.widgets.sparsity  threshold_widget: predictor threshold (notebook 02; flashnb.lab.sparsity computes)
    flashnb.widgets.engine    window_explorer: window size -> data read per token (notebook 03);
                              dtype_selector: FFN row format -> bytes, quality, I/O per token (04)
    flashnb.widgets.tour      budget_explorer: DRAM budget -> latency (06); model_folder_box (07)

Each builder returns a plain ipywidgets box whose default value is what CI runs headless. Figures inside
a widget are `go.FigureWidget`s built from a `flashnb.viz` figure, so colours, marks (measured / modeled /
paper) and axis titles are those of `flashnb.viz.style`. A notebook cell that shows a widget starts
with `# NBVAL_IGNORE_OUTPUT`, and widget state is never committed (see flashnb.notebook_outputs).
"""
