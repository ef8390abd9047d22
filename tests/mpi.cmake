# tests/mpi.cmake - data-parallel kdkit train under mpirun (tests/mpi/), only
# when the build has MPI (CMake KD_MPI; scripts/install-deps.sh installs
# libopenmpi-dev and openmpi-bin).  Open MPI refuses to run as root unless
# told (the OMPI_ALLOW_RUN_AS_ROOT pair below, or --allow-run-as-root), and it
# keeps allocations until exit by design, so LeakSanitizer is off for the
# ranks (AddressSanitizer's other checks stay on).
if(KD_MPI_ON)
  add_executable(test_mpi_train ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_mpi_train.c)
  target_link_libraries(test_mpi_train PRIVATE kdkit_static kd_test_support PkgConfig::CMOCKA)
  target_include_directories(test_mpi_train PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_definitions(test_mpi_train PRIVATE
    KD_SOURCE_DIR="${PROJECT_SOURCE_DIR}" KD_BINARY_DIR="${PROJECT_BINARY_DIR}")
  add_test(NAME test_mpi_train COMMAND test_mpi_train)
  set_tests_properties(test_mpi_train PROPERTIES TIMEOUT 600
    ENVIRONMENT "KDKIT=$<TARGET_FILE:kdkit_cli>;ASAN_OPTIONS=detect_leaks=0;OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
endif()
