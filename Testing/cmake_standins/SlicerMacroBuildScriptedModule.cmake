# Stand-in for slicerMacroBuildScriptedModule (Slicer/Slicer 583e9b3, CMake/SlicerMacroBuildScriptedModule.cmake):
# unknown keywords and a missing NAME stop configuration; every SCRIPTS/RESOURCES entry must exist (relative to the
# current source folder, ".py" optional); Slicer_USE_PYTHONQT is required. The scripts and resources go through
# ctkMacroCompilePythonScript into <build>/lib/Slicer-X.Y/qt-scripted-modules, installed into the same relative
# folder (NO_INSTALL_SUBDIR); WITH_GENERIC_TESTS registers the generic module test when BUILD_TESTING is on.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${MY_SLICER_UNPARSED_ARGUMENTS}\"")
  endif()
  if(NOT DEFINED MY_SLICER_NAME)
    message(FATAL_ERROR "NAME is mandatory")
  endif()
  foreach(_var SCRIPTS RESOURCES)
    foreach(_value ${MY_SLICER_${_var}})
      set(_absolute ${_value})
      if(NOT IS_ABSOLUTE ${_value})
        set(_absolute ${CMAKE_CURRENT_SOURCE_DIR}/${_value})
      endif()
      if(NOT EXISTS ${_absolute} AND NOT EXISTS ${_absolute}.py)
        message(FATAL_ERROR "slicerMacroBuildScriptedModule(${_var}) given nonexistent file or directory '${_value}'")
      endif()
    endforeach()
  endforeach()
  if(NOT Slicer_USE_PYTHONQT)
    message(FATAL_ERROR "Attempting to build the Python scripted module '${MY_SLICER_NAME}' when Slicer_USE_PYTHONQT is OFF")
  endif()
  set(_subdir "")
  set(_no_install_subdir NO_INSTALL_SUBDIR)
  if(MY_SLICER_WITH_SUBDIR)
    get_filename_component(_subdir ${CMAKE_CURRENT_SOURCE_DIR} NAME)
    set(_subdir "/${_subdir}")
    set(_no_install_subdir "")
  endif()
  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}${_subdir}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    ${_no_install_subdir}
    )
  if(BUILD_TESTING AND MY_SLICER_WITH_GENERIC_TESTS)
    set(_generic ${CMAKE_CURRENT_BINARY_DIR}/qSlicer${MY_SLICER_NAME}ModuleGenericTest.py)
    file(WRITE ${_generic} "# generic test of the ${MY_SLICER_NAME} module (stand-in)\n")
    slicer_add_python_unittest(SCRIPT ${_generic} TESTNAME_PREFIX nomainwindow_)
  endif()
endmacro()
