# ruff: noqa: E501
"""
@article{Punjani2017,
  title = {cryoSPARC: algorithms for rapid unsupervised cryo-EM structure determination},
  author = {Punjani, Ali and Rubinstein, John L. and Fleet, David J. and Brubaker, Marcus A.},
  journal = {Nature Methods},
  volume = {14},
  number = {3},
  pages = {290--296},
  year = {2017},
  doi = {http://dx.doi.org/10.1038/nmeth.4169}
}

@article{Toader2025,
  title = {Efficient high-resolution refinement in cryo-EM with stochastic gradient descent},
  author = {Toader, Bogdan and Brubaker, Marcus A. and Lederman, Roy R.},
  journal = {Acta Crystallographica Section D},
  volume = {81},
  pages = {327--343},
  year = {2025},
  doi = {http://dx.doi.org/10.1107/S205979832500511X}
}

@article{Kim2025,
  title = {bioRxiv preprint 10.1101/2025.09.08.674935: gold-standard stochastic gradient descent ab initio refinement (the method of cryoSPARC's Homogeneous Ab-Initio Refinement)},
  author = {Kim and Li and Clarke},
  journal = {bioRxiv},
  year = {2025},
  doi = {http://dx.doi.org/10.1101/2025.09.08.674935}
}

@article{Scheres2012,
  title = {Prevention of overfitting in cryo-EM structure determination},
  author = {Scheres, Sjors H. W. and Chen, Shaoxia},
  journal = {Nature Methods},
  volume = {9},
  number = {9},
  pages = {853--854},
  year = {2012},
  doi = {http://dx.doi.org/10.1038/nmeth.2115}
}

@article{Rosenthal2003,
  title = {Optimal determination of particle orientation, absolute hand, and contrast loss in single-particle electron cryomicroscopy},
  author = {Rosenthal, Peter B. and Henderson, Richard},
  journal = {Journal of Molecular Biology},
  volume = {333},
  number = {4},
  pages = {721--745},
  year = {2003},
  doi = {http://dx.doi.org/10.1016/j.jmb.2003.07.013}
}
"""
