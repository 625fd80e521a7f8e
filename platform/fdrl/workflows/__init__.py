"""What each job does, composed from the layers below: ``fdrl.distributed`` (Ray) and
``fdrl.tracking`` (MLflow) meet here, so neither needs the other."""
