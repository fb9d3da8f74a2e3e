"""Training the shipped model and its predictors: the offline corpus, `flashnb train`, activation
traces and their statistics, predictor training and quality (`flashnb train-predictors`)."""
