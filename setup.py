from setuptools import find_packages, setup

setup(
    name='repq_mm',
    version='0.1.0',
    description='RepQ: quantization-aware training for re-parameterized networks, '
    'as an OpenMMLab plugin suite',
    packages=find_packages(include=['repq_mm', 'repq_mm.*']),
    python_requires='>=3.10',
    install_requires=['torch'],
    extras_require={'mm': ['mmengine==0.10.7', 'mmcv==2.1.0', 'mmdet==3.3.0',
                           'mmpretrain==1.2.0', 'pycocotools']},
)
