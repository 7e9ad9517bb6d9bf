# Stand-in for CTK's ctkMacroCompilePythonScript (commontk/CTK 868d56c, and dd4caea which Slicer v5.10.0 pins,
# CMake/ctkMacroCompilePythonScript.cmake). As the real macro: TARGET_NAME, SCRIPTS, DESTINATION_DIR and INSTALL_DIR
# are mandatory; an empty value counts as absent (CTK's argument parser drops empty list items), so `SCRIPTS ""`
# stops configuration. Scripts (".py" appended when missing) and resources are copied from SOURCE_DIR (default: the
# current source folder) to DESTINATION_DIR/<relative path> at build time; an absolute script path goes to
# DESTINATION_DIR/<its path relative to CMAKE_CURRENT_BINARY_DIR>. The scripts are byte-compiled with
# PYTHON_EXECUTABLE (Slicer's Python), and DESTINATION_DIR is installed into INSTALL_DIR (install(DIRECTORY), at
# every call: its contents with NO_INSTALL_SUBDIR, else the folder itself).
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" ""
    "TARGET_NAME;SCRIPTS;RESOURCES;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" ${ARGN})
  foreach(_name TARGET_NAME SCRIPTS DESTINATION_DIR INSTALL_DIR)
    if(NOT DEFINED MY_${_name} OR "${MY_${_name}}" STREQUAL "")
      message(FATAL_ERROR "${_name} is mandatory")
    endif()
  endforeach()
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  get_filename_component(MY_SOURCE_DIR ${MY_SOURCE_DIR} REALPATH)
  get_filename_component(MY_DESTINATION_DIR ${MY_DESTINATION_DIR} REALPATH)
  set(_copied_scripts)
  foreach(_file ${MY_SCRIPTS})
    get_filename_component(_ext ${_file} EXT)
    if(NOT "${_ext}" MATCHES "py")
      set(_file "${_file}.py")
    endif()
    if(IS_ABSOLUTE ${_file})
      set(_src ${_file})
      file(RELATIVE_PATH _file ${CMAKE_CURRENT_BINARY_DIR} ${_src})
    else()
      set(_src ${MY_SOURCE_DIR}/${_file})
    endif()
    if(NOT EXISTS ${_src})
      message(FATAL_ERROR "ctkMacroCompilePythonScript(${MY_TARGET_NAME}): no script ${_src}")
    endif()
    add_custom_command(OUTPUT ${MY_DESTINATION_DIR}/${_file} DEPENDS ${_src}
      COMMAND ${CMAKE_COMMAND} -E copy ${_src} ${MY_DESTINATION_DIR}/${_file})
    list(APPEND _copied_scripts ${MY_DESTINATION_DIR}/${_file})
  endforeach()
  set(_copied_resources)
  foreach(_file ${MY_RESOURCES})
    add_custom_command(OUTPUT ${MY_DESTINATION_DIR}/${_file} DEPENDS ${MY_SOURCE_DIR}/${_file}
      COMMAND ${CMAKE_COMMAND} -E copy ${MY_SOURCE_DIR}/${_file} ${MY_DESTINATION_DIR}/${_file})
    list(APPEND _copied_resources ${MY_DESTINATION_DIR}/${_file})
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonScriptFiles ALL DEPENDS ${_copied_scripts})
  if(_copied_resources)
    add_custom_target(Copy${MY_TARGET_NAME}PythonResourceFiles ALL DEPENDS ${_copied_resources})
  endif()
  add_custom_target(Compile${MY_TARGET_NAME}PythonFiles ALL
    COMMAND ${PYTHON_EXECUTABLE} -m py_compile ${_copied_scripts}
    DEPENDS Copy${MY_TARGET_NAME}PythonScriptFiles)
  if(MY_NO_INSTALL_SUBDIR)
    install(DIRECTORY "${MY_DESTINATION_DIR}/" DESTINATION "${MY_INSTALL_DIR}" COMPONENT RuntimeLibraries USE_SOURCE_PERMISSIONS)
  else()
    install(DIRECTORY "${MY_DESTINATION_DIR}" DESTINATION "${MY_INSTALL_DIR}" COMPONENT RuntimeLibraries USE_SOURCE_PERMISSIONS)
  endif()
endmacro()
