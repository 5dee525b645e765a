"""Training: the online loop (:mod:`rlmt.train.online`; its methods are the rows of
:data:`rlmt.train.methods.METHODS`), the offline loop (:mod:`rlmt.train.offline`; its methods are tasks), and
the choice between them (:mod:`rlmt.train.runner`)."""
