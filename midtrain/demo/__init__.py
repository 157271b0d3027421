"""``midtrain demo``: the whole method on one CPU in minutes, with no download.

``corpus`` builds the demo corpus (``midtrain prepare demo``), ``run`` trains, evaluates and reports
(``midtrain demo``), ``claims`` checks the papers' claims against the run's numbers.
"""
