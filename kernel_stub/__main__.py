from kernel_stub.stub import main

main()
