"""Commands for the paper results that have no module of their own: Table 4, App. G (Fig. 9, Table 12), Fig. 11."""
